"""The ingest and validate stages' params sections (the data contract itself: lathe.data.contract)."""

from __future__ import annotations

from pydantic import Field, model_validator

from lathe.config import Section, Seed


class IngestParams(Section):
    image_size: int = Field(64, ge=8, le=1024, description="square side in pixels after resize")
    seed: int = Seed
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.25, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _train_split_left(self) -> IngestParams:
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:.2f} "
                "leaves less than 20% for training; lower one of them"
            )
        return self


class ValidateParams(Section):
    """The data gate's thresholds; every one becomes a Great Expectations expectation."""

    min_rows: int = Field(20, ge=1)
    max_rows: int = Field(1_000_000, ge=1)
    min_per_class_per_split: int = Field(1, ge=0, description="samples of each class in each split")
    pixel_mean_min: float = Field(5.0, description="per-image mean of the source pixels on the 8-bit scale")
    pixel_mean_max: float = 250.0
    pixel_std_min: float = Field(1.0, ge=0, description="below this an image is (nearly) blank")
    source_min_side: int = Field(32, ge=1, description="smallest accepted source image side in px")

    @model_validator(mode="after")
    def _bounds(self) -> ValidateParams:
        if self.min_rows > self.max_rows:
            raise ValueError(f"min_rows ({self.min_rows}) is larger than max_rows ({self.max_rows})")
        if self.pixel_mean_min > self.pixel_mean_max:
            raise ValueError(
                f"pixel_mean_min ({self.pixel_mean_min}) is larger than pixel_mean_max ({self.pixel_mean_max})"
            )
        return self
