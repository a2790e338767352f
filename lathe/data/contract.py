"""The data contract: what a plant must get right, in one place.

Raw layout (any plant, any labelled images)::

    data/raw/
      labels.csv        header `file,label[,more...]`; UTF-8 (a BOM is accepted)
                        file:  path relative to data/raw, forward slashes (images/line3/0001.png)
                        label: a class name from params `data.classes`
                        further columns are metadata: kept in the manifest, usable in `data.stratify`
                        and as `data.group`
      <the image files> PNG, JPEG, BMP or TIFF; 8- or 16-bit; gray, RGB or RGBA; any aspect ratio

params.yaml `data:` (DataParams) names the classes in index order, which of them count as defective,
the input channels, the split stratification and grouping, the resize policy and the pixel limit.
Ingest reads it once and writes it, resolved, to data/prepared/task.json (Task): every later stage,
the package and the model card read the task from there, so a stage depends on its own params only.

The task is an image classification task today; `kind` leaves room for a second modality (1-D sensor
windows) beside it: a Task of another kind would bring its own reader and input shape, and every
consumer that only needs classes and the defective set stays as it is.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lathe.config import Section
from lathe.errors import DataError
from lathe.io import write_json

Channels = Literal[1, 3]  # model input channels: gray or RGB
ResizePolicy = Literal["squash", "pad"]  # how a source becomes a square (lathe.data.images.resize_image)

LABELS_FILE = "labels.csv"
REQUIRED_COLUMNS = ("file", "label")
TASK_FILE = "task.json"
CLASS_NAME = r"^[A-Za-z0-9][A-Za-z0-9 _.+-]{0,99}$"  # also a folder name (import-folder) and a metric key part
# Manifest columns ingest computes; a labels.csv metadata column may not take one of these names.
COMPUTED_COLUMNS = ("sample_id", "file", "sha256", "label", "label_index", "split", "src_width", "src_height",
                    "src_mode", "src_bit_depth", "pixel_mean", "pixel_std")


class DataParams(Section):
    """params.yaml `data:` — the task contract (README "Bring your own data")."""

    classes: list[str] = Field(min_length=2, max_length=256, description="class names in index order")
    defective: list[str] = Field(min_length=1, description="the classes that count as a defect (recall, escape, "
                                 "false-reject rate, the package threshold)")
    channels: Channels = Field(1, description="model input channels: 1 gray, 3 RGB (sources are converted)")
    stratify: list[str] = Field(default_factory=lambda: ["label"], description="columns whose combinations are "
                                "split in proportion: label and/or metadata columns of labels.csv")
    group: str | None = Field(None, description="metadata column whose values never straddle two splits "
                              "(module, wafer, lot): the leakage guard")
    resize: ResizePolicy = Field("squash", description="squash: stretch to a square; pad: keep the aspect ratio, "
                                 "centre on black")
    max_pixels: int = Field(50_000_000, ge=1, description="largest source image (width x height) accepted; the "
                            "header is checked before any pixel is decoded")

    @model_validator(mode="after")
    def _consistent(self) -> DataParams:
        bad = [c for c in self.classes if not re.match(CLASS_NAME, c)]
        if bad:
            raise ValueError(f"class name(s) {bad} must be 1-100 letters, digits, space, _ . + - (starting with a "
                             "letter or digit)")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be distinct")
        unknown = [c for c in self.defective if c not in self.classes]
        if unknown:
            raise ValueError(f"defective names {unknown}, not in classes {self.classes}"
                             f"{_hint(unknown[0], self.classes)}")
        if set(self.defective) == set(self.classes):
            raise ValueError("every class is defective: at least one class must count as good")
        if self.group is not None and self.group in self.stratify:
            raise ValueError(f"group column {self.group!r} cannot also be a stratify column")
        for col in (*self.stratify, *([self.group] if self.group else [])):
            if col != "label" and col in COMPUTED_COLUMNS:
                raise ValueError(f"{col!r} is a column ingest computes, not a labels.csv metadata column")
        return self

    @property
    def metadata_columns(self) -> list[str]:
        """The labels.csv metadata columns the split needs (stratify and group), in order."""
        return stratify_metadata(self.stratify, self.group)


class Task(BaseModel):
    """data/prepared/task.json: the resolved contract every stage after ingest reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["image_classification"] = "image_classification"
    classes: list[str] = Field(min_length=2)
    defective: list[str] = Field(min_length=1)
    channels: Channels = 1
    image_size: int = Field(ge=1)
    resize: ResizePolicy = "squash"
    metadata: list[str] = Field(default_factory=list, description="labels.csv metadata columns kept in the manifest")
    stratify: list[str] = Field(default_factory=lambda: ["label"], description="columns the splits are stratified on")
    group: str | None = Field(None, description="metadata column no value of which is in two splits")

    @model_validator(mode="after")
    def _consistent(self) -> Task:  # task.json is read back from disk: hold it to the contract again
        unknown = [c for c in self.defective if c not in self.classes]
        if unknown or len(set(self.classes)) != len(self.classes) or set(self.defective) >= set(self.classes):
            raise ValueError(f"classes {self.classes} must be distinct and include the defective {self.defective}, "
                             "with at least one good class")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def defective_indices(self) -> list[int]:
        """Indices of the defective classes, ascending."""
        return sorted(self.classes.index(c) for c in self.defective)

    @property
    def stratify_metadata(self) -> list[str]:
        """The metadata columns the split used (stratify and group): every row must have a value."""
        return stratify_metadata(self.stratify, self.group)


def stratify_metadata(stratify: list[str], group: str | None) -> list[str]:
    """The metadata columns a split on `stratify` and `group` needs, in order (`label` is not metadata)."""
    cols = [c for c in stratify if c != "label"]
    return cols + ([group] if group and group not in cols else [])


def task_of(params: DataParams, image_size: int, metadata: list[str]) -> Task:
    return Task(classes=params.classes, defective=params.defective, channels=params.channels,
                image_size=image_size, resize=params.resize, metadata=metadata, stratify=params.stratify,
                group=params.group)


def write_task(prepared_dir: Path, task: Task) -> None:
    write_json(Path(prepared_dir) / TASK_FILE, task.model_dump(mode="json"))


def read_task(prepared_dir: Path) -> Task:
    """The task ingest wrote beside the prepared data; one-line errors naming the file."""
    path = Path(prepared_dir) / TASK_FILE
    try:
        return Task.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise DataError(f"{path}: task file not found (run the ingest stage)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSON or pydantic
        raise DataError(f"{path}: not a valid task file ({' '.join(str(exc).split())[:300]})") from None


def _hint(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
