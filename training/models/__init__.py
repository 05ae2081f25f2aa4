"""The models a run trains on: the teacher (loading, refusals), the UNet's adapters, the UNet as an eps model, the
discriminator."""
