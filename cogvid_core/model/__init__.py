"""model: CogVideoX as data and files. Variants and their configs (``variants``), checkpoint recognition
by structure (``checkpoints``, ``tensors``; ComfyUI core's own transformer names: ``corelayout``),
sources and hub downloads (``sources``), loading (``loading``, ``fileindex``), LoRA files (``lora``), the
operations that wrap diffusers and transformers (``text``: prompt encode, ``vae``: image encode and tiled
decode, ``tiles``: the tile rule), exact sizes (``sizes``), the stage names (``stages``), the
latent-to-RGB projection of live previews (``latent_rgb``) and the random checkpoints the tests, the
demo and the benches write (``testing``; its values and file writer: ``testing_files``).

May import: ``device``. A new model variant starts in ``variants`` (its config as data) and
``checkpoints`` (how its files are recognised).
"""
