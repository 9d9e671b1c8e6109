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


@pytest.mark.parametrize("name", PRESETS)
def test_v2_presets_wire_encoder_unet_and_flow_together(name):
    """The encoder sees y only; the ε-UNet and the flow see [y, x̂0_enc]; the flow takes the encoder's features.
    The ``ddpm`` comparison preset is a plain conditional DDPM: its ε-UNet sees y alone, over the full chain."""
    from ftddm_core.config import COND_CHANNELS

    cfg = preset(name)
    assert cfg.encoder.image_channels == 0 and cfg.encoder.cond_channels == len(COND_CHANNELS)
    if cfg.kind == "ftddm":
        assert cfg.flow.cond_channels == len(COND_CHANNELS) + 1
        assert cfg.flow.feature_channels == cfg.encoder.channels
        expected = len(COND_CHANNELS) if name == "ddpm" else len(COND_CHANNELS) + 1
        assert cfg.unet.cond_channels == expected
    if name == "ddpm":
        assert cfg.diffusion.t_trunc == cfg.diffusion.num_timesteps - 1


def test_a_v1_config_field_is_rejected_by_name():
    d = preset("tiny").to_dict()
    d["unet"]["norm_groups"] = 8  # v1 GroupNorm setting, gone with the per-pixel norm
    with pytest.raises(ValueError, match="norm_groups"):
        FTDDMConfig.from_dict(d)
