"""The names of a build's pixel choices, in a module that imports nothing: the build's parent process checks
its options with them without loading OpenCV (its workers decode; it only plans, joins and writes).
`cxrshards.pixels` implements them."""
from __future__ import annotations

FITS = ("pad", "squash", "crop")
CODECS = ("png", "jpeg", "raw")
CODEC_EXTENSIONS = {"png": "png", "jpeg": "jpg", "raw": "npy"}   # the shard member suffix of each codec
