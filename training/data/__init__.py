"""What the student learns from: --data parsed into a source, image + caption pairs, aspect-ratio buckets, the latent
and caption cache, data-free teacher images, the shapes world."""
