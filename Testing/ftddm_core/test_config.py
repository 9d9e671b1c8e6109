"""Config JSON round trips and presets."""
import pytest

from ftddm_core.config import PRESETS, FTDDMConfig, preset


@pytest.mark.parametrize("name", PRESETS)
def test_json_round_trip(name):
    cfg = preset(name)
    again = FTDDMConfig.from_json(cfg.to_json())
    assert again == cfg
    assert isinstance(again.unet.channels, tuple)


def test_unknown_fields_and_presets_rejected():
    d = preset("tiny").to_dict()
    d["unet"]["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        FTDDMConfig.from_dict(d)
    with pytest.raises(ValueError, match="unknown config"):
        preset("huge")
