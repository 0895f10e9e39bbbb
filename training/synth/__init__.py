"""Synthetic images for training and measuring rejection, made with numpy and Pillow only (no torch).

- `glyphs`: printed letters and symbols unlike any digit, from the fonts on the machine, split into
  fonts and glyphs used for training and others kept for measuring.
- `negatives`: non-digit images of many kinds (strokes, shapes, scribbles, blobs, letters, symbols,
  several digits at once, textures, ...), each passed through the server's own recipe.
- `clientstyle`: real digits re-rendered the way clients send them (black on white, any size, PNG, JPEG
  or BMP) and brought back through `service.recognition.preprocess.to_pixels`.
"""
