"""Compression: prune, lowrank, distill and quantize, each from a source model folder to a compressed one."""
