"""Thin DVC stage entry points: read argv paths and one params section, call lathe, write declared outs."""
