"""Keep-best's scores, by name: a feature space of the teacher's own networks (eval/features.py), what the student's
samples are compared with and how. Plain data, read by the config (the --keep-best-score choices) and keep_best.py."""

from dataclasses import dataclass

FEATURE_NAMES = ("latent", "vae", "unet")  # eval/features.py's FEATURES, in this order


@dataclass(frozen=True)
class Score:
    """feature: one of FEATURE_NAMES; reference: 'teacher' (the teacher's many-step samples from the same noise and
    caption) or 'images' (the withheld images); distance: 'fd' (the Frechet distance between the two sets) or
    'paired' (the mean squared feature distance of each sample to its teacher sample)."""

    feature: str
    reference: str
    distance: str

    @property
    def name(self):
        return f"{self.feature}_{self.distance}_{self.reference}"

    def describe(self, synth_steps):
        """'FD of unet features to the teacher's 25-step samples'."""
        how = {"fd": "FD", "paired": "mean squared distance"}[self.distance]
        to = {"teacher": f"the teacher's {synth_steps}-step samples", "images": "the withheld images"}[self.reference]
        return f"{how} of {self.feature} features to {to}"


SCORES = {
    s.name: s
    for s in [Score(f, "teacher", d) for f in FEATURE_NAMES for d in ("fd", "paired")]
    + [Score(f, "images", "fd") for f in FEATURE_NAMES]
}
DEFAULT_SCORE = "vae_paired_teacher"  # docs/keep_best.md: the best rank correlation with the world judge
