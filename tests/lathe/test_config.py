from pathlib import Path

import pytest

from lathe.config import load_section, parse_section
from lathe.data.params import IngestParams, ValidateParams
from lathe.errors import ConfigError
from lathe.model.params import TrainParams

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_params_yaml_is_valid_for_every_section():
    from lathe.measure.params import EvaluateParams

    for name, model in [("ingest", IngestParams), ("validate", ValidateParams),
                        ("train_teacher", TrainParams), ("evaluate", EvaluateParams)]:
        load_section(ROOT / "params.yaml", name, model)


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        parse_section({"ingest": {"image_sise": 64}}, "ingest", IngestParams)
    msg = str(err.value)
    assert "ingest.image_sise" in msg and "image_size" in msg and "unknown key" in msg


def test_nested_typo_is_reported_with_its_full_path():
    with pytest.raises(ConfigError, match=r"train_teacher\.arch\.widht"):
        parse_section({"train_teacher": {"arch": {"widht": [8]}}}, "train_teacher", TrainParams)


def test_out_of_range_value_says_what_was_expected():
    with pytest.raises(ConfigError) as err:
        parse_section({"ingest": {"test_fraction": 0.9}}, "ingest", IngestParams)
    assert "ingest.test_fraction" in str(err.value) and "0.9" in str(err.value)


def test_splits_leaving_too_little_training_data_are_refused():
    with pytest.raises(ConfigError, match="less than 20% for training"):
        parse_section({"ingest": {"val_fraction": 0.45, "test_fraction": 0.45}}, "ingest", IngestParams)


def test_ensemble_needs_at_least_one_member():
    with pytest.raises(ConfigError) as err:
        parse_section({"train_teacher": {"ensemble": {"members": 0}}}, "train_teacher", TrainParams)
    assert "train_teacher.ensemble.members" in str(err.value) and "0" in str(err.value)


def test_arch_stage_lists_must_match():
    with pytest.raises(ConfigError, match="equal length"):
        parse_section({"train_teacher": {"arch": {"widths": [8, 16], "blocks": [1]}}}, "train_teacher", TrainParams)


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_section(tmp_path / "nope.yaml", "ingest", IngestParams)
    bad = tmp_path / "params.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_section(bad, "ingest", IngestParams)


def test_a_misspelt_section_is_an_error_with_a_did_you_mean_not_silent_defaults():
    with pytest.raises(ConfigError, match=r"no section 'ingest' \(did you mean 'ingset'\?\)"):
        parse_section({"ingset": {"image_size": 32}, "validate": {}}, "ingest", IngestParams)


def test_an_empty_section_takes_the_defaults():
    assert parse_section({"ingest": None}, "ingest", IngestParams) == IngestParams()


def test_a_stage_reading_a_misspelt_section_stops_naming_the_file(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("validate: {}\ntrain_teachr:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"params.yaml: no section 'train_teacher' \(did you mean 'train_teachr'\?\)"):
        load_section(params, "train_teacher", TrainParams)
