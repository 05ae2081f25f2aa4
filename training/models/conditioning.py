"""What the UNet is conditioned on besides the latent and the timestep: the captions' hidden states and, for an
SDXL-family UNet, the pooled text embedding and the size time ids (original size, crop top-left, target size),
carried together through encoding, the cache, the SCott step, the discriminator and validation."""

from dataclasses import dataclass

import torch

from scott_core.schedule import append_dims


@dataclass
class Conditioning:
    """A batch's conditioning: hidden states [B, 77, D]; SDXL also pooled [B, P] and time ids [B, 6] (original
    height, width, crop top, left, target height, width: diffusers' add_time_ids order); None where absent."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def map(self, fn):
        """A Conditioning of fn(tensor) for each tensor present."""
        return Conditioning(*(None if t is None else fn(t) for t in (self.states, self.pooled, self.time_ids)))

    def float(self):
        """Every tensor in float32."""
        return self.map(lambda t: t.float())

    def to(self, device):
        """Every tensor on `device`."""
        return self.map(lambda t: t.to(device))

    def __getitem__(self, index):
        return self.map(lambda t: t[index])

    def __len__(self):
        return self.states.shape[0]

    @staticmethod
    def cat(conds):
        """The conditionings' samples one after another (each field concatenated on the batch dimension)."""
        fields = zip(*((c.states, c.pooled, c.time_ids) for c in conds))
        return Conditioning(*(None if parts[0] is None else torch.cat(parts) for parts in fields))

    def like(self, cond):
        """This one-row (unconditional) conditioning for every sample of `cond`: its text parts expanded to cond's
        batch, with cond's time ids (the empty caption is asked about the same image size)."""
        batch = len(cond)
        pooled = None if self.pooled is None else self.pooled.expand(batch, -1)
        return Conditioning(self.states.expand(batch, -1, -1), pooled, cond.time_ids)

    def where(self, mask, other):
        """Per sample, `other`'s text parts (hidden states and pooled) where mask [B] is true, else this one's;
        the time ids stay this one's (caption dropout changes the caption, not the image)."""

        def pick(mine, theirs):
            return None if mine is None else torch.where(append_dims(mask.to(mine.device), mine.ndim), theirs, mine)

        return Conditioning(pick(self.states, other.states), pick(self.pooled, other.pooled), self.time_ids)

    def pipeline_kwargs(self, uncond):
        """The prompt-embedding arguments of the family's diffusers pipeline for these captions against `uncond` (one
        row per caption): prompt_embeds and negative_prompt_embeds, and SDXL's pooled pair where present (the
        pipeline makes its own time ids: uncropped, at the height and width it is asked for)."""
        kwargs = {"prompt_embeds": self.states, "negative_prompt_embeds": uncond.states}
        if self.pooled is not None:
            kwargs.update(pooled_prompt_embeds=self.pooled, negative_pooled_prompt_embeds=uncond.pooled)
        return kwargs

    def unet_kwargs(self):
        """The keyword arguments of a diffusers UNet2DConditionModel call: encoder_hidden_states, and SDXL's
        added_cond_kwargs (text_embeds, time_ids) where a pooled embedding is present."""
        kwargs = {"encoder_hidden_states": self.states}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs
