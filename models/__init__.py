"""The embedded model stack: enhancer (issue 4); VAE, DiT and reward heads arrive with issue 5.

CLIP (clip.py, train_clip.py): `load_clip(spec)` loads any open_clip model (an
architecture name, "ARCH:tag", "hf-hub:...", "ARCH@checkpoint" or a folder saved by
`save_clip`) as a `ClipBundle` with `encode_images` / `encode_texts`. The embedded
default, `dataengine-clip-lite0`, pairs the packaged ImageNet EfficientNet-Lite0 and
MiniLM-L6 trunks (frozen) with projections that `train_default_clip` trains once per
workspace, starting from the ImageNet-class composite, into `<ws>/models/clip/vNNNN/`.
"""
