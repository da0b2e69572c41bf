import dataclasses
import subprocess
import sys

import pytest

from minimedi.config import PRESETS, SECTIONS, Config, config_from_dict, config_to_dict, make_config
from minimedi.errors import UserError
from minimedi.flags import flag_name, parse_config


def test_flag_names_unique_across_sections():
    seen = {}
    for s in SECTIONS:
        for f in dataclasses.fields(getattr(Config(), s)):
            for flag in (flag_name(f), *f.metadata.get("aliases", ())):
                assert flag not in seen, f"{flag} in both {s} and {seen.get(flag)}"
                seen[flag] = s


def test_presets_only_name_existing_fields():
    for name, layers in PRESETS.items():
        cfg = make_config(name)
        for section, values in layers.items():
            for k, v in values.items():
                assert getattr(getattr(cfg, section), k) == v


def test_flags_override_preset_and_keep_types():
    cfg = parse_config(["--preset", "tiny", "--lambda-clip", "2", "--dim-mults", "1", "2", "4",
                        "--prompt", "a", "--prompt", "b", "--resume", "--target-female", "0.4"])
    assert cfg.preset == "tiny" and cfg.run_dir == "runs/tiny"
    assert cfg.align.lambda_clip == 2.0 and isinstance(cfg.align.lambda_clip, float)
    assert cfg.unet.dim_mults == (1, 2, 4)
    assert cfg.sample.prompt == ["a", "b"]
    assert cfg.run.resume is True
    assert cfg.align.target_female == 0.4
    assert cfg.data.image_size == PRESETS["tiny"]["data"]["image_size"]


def test_defaults_without_flags():
    cfg = parse_config([])
    assert cfg == make_config("default")
    assert cfg.align.target_female is None and cfg.sample.prompt == []


def test_roundtrip_through_plain_dict():
    cfg = make_config("paper", sample={"prompt": ["x"]})
    d = config_to_dict(cfg)
    assert config_from_dict(d) == cfg
    d["unet"]["removed_in_a_later_version"] = 1
    assert config_from_dict(d) == cfg


def test_unknown_preset_is_user_error():
    with pytest.raises(UserError):
        make_config("huge")


@pytest.mark.parametrize("argv", [["--bogus"], ["--steps", "many"], ["--schedule", "quadratic"],
                                  ["--preset", "huge"]])
def test_bad_flags_exit_2_with_one_line(argv):
    code = "import sys; from minimedi.flags import parse_config; parse_config(sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr


def test_help_lists_every_flag():
    code = "from minimedi.flags import parse_config; parse_config(['--help'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0
    for s in SECTIONS:
        for f in dataclasses.fields(getattr(Config(), s)):
            assert flag_name(f) in r.stdout
