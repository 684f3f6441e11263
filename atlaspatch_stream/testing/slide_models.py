"""Seeded random weights for the slide encoders' tests and benchmarks (never real weights).

- `write_moozy_checkpoint`: a `moozy.pt` in the layout the `moozy` package's loader reads (teacher slide encoder,
  its config, case transformer, its config), built with the package's own classes, in any size.
- `write_lunit_weights`: a random `lunit_vit_small_patch8_dino` (timm ViT-S/8) state dict, MOOZY's patch encoder.
"""

from __future__ import annotations

from pathlib import Path


def write_moozy_checkpoint(path: Path, *, seed: int = 0, d_model: int = 64, layers: int = 2, heads: int = 4,
                           case_layers: int = 1) -> Path:
    """Save a MOOZY checkpoint with seeded random weights (the real model: d_model 768, 6 layers, 12 heads, 3 case
    layers); its shape is read back from the checkpoint by the package's loader."""
    import torch
    from moozy.models.moozy_slide_encoder import MOOZYSlideEncoder
    from moozy.models.serialization import extract_case_transformer_config, extract_slide_encoder_config
    from moozy.models.stage2_supervised import MOOZY

    torch.manual_seed(seed)
    encoder = MOOZYSlideEncoder(feat_dim=384, d_model=d_model, n_heads=heads, n_layers=layers,
                                dim_feedforward=4 * d_model, num_registers=4, dropout=0.0, layerscale_init=1e-5)
    model = MOOZY(slide_encoder=encoder, case_transformer_layers=case_layers, case_transformer_heads=heads,
                  case_transformer_ffn_dim=4 * d_model, case_transformer_dropout=0.0)
    payload = {
        "teacher_slide_encoder": encoder.state_dict(),
        "slide_encoder_config": extract_slide_encoder_config(encoder),
        "case_transformer": model.case_transformer.state_dict(),
        "case_transformer_config": extract_case_transformer_config(model.case_transformer),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def write_lunit_weights(path: Path, *, seed: int = 0) -> Path:
    """Save a seeded random timm `vit_small_patch8_224` state dict as safetensors."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
