"""Scoring LoRAs: generation of image sets, FID / CLIP score / precision-recall-density-coverage, COCO protocol."""
