"""Measuring and fitting the number reader on composed numbers of real digits (docs/reading.md)."""
