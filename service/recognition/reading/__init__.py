"""Reading whole numbers: one line of digits in an image -> the digit string, a box and a confidence
for each digit. `segment` finds the candidate pieces, `reader` classifies them (through the same
batcher as single digits) and chooses the segmentation with the highest joint score."""
