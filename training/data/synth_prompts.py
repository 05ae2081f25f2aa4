"""Prompts for data-free distillation: a built-in list made from templates, or a user's prompt file."""

import itertools
import random
from pathlib import Path

from ..errors import UserError

SUBJECTS = [
    "an old fisherman", "a young woman with freckles", "a red fox", "a snow leopard", "a lighthouse",
    "a vintage car", "a steam locomotive", "a bowl of ramen", "a cup of coffee", "a medieval castle",
    "a cyberpunk street", "a mountain lake", "a sunflower field", "a golden retriever", "a tabby cat",
    "an astronaut", "a samurai", "a ballet dancer", "a jazz musician", "a chef", "a hot air balloon",
    "a wooden sailboat", "a desert canyon", "a bamboo forest", "a glass greenhouse", "a city skyline",
    "a cozy library", "a rainy alley", "a stone bridge", "a waterfall", "a koi pond", "a robot",
    "a dragon", "a wizard's tower", "a treehouse", "a farmhouse kitchen", "a bowl of fruit", "a bouquet of roses",
    "a hummingbird", "an owl", "a humpback whale", "a coral reef", "a polar bear", "a herd of horses",
    "a child flying a kite", "an elderly couple", "a street market", "a subway station", "a cathedral interior",
    "a modern living room", "a japanese temple", "a northern lights sky", "a volcano", "a field of lavender",
    "a motorcycle", "a pair of sneakers", "a wristwatch", "a chess board", "a violin", "a loaf of bread",
]
SETTINGS = [
    "at sunrise", "at golden hour", "at night", "in the rain", "in heavy snow", "in thick fog",
    "under a starry sky", "on a summer afternoon", "in autumn", "in spring bloom", "by candlelight",
    "under neon lights", "on a misty morning", "in a storm", "in the desert heat", "underwater",
]
STYLES = [
    "a photograph", "a 35mm film photo", "a studio portrait", "an oil painting", "a watercolor painting",
    "a pencil sketch", "a charcoal drawing", "an ink illustration", "a digital painting", "concept art",
    "an anime illustration", "a pixel art scene", "a 3d render", "a claymation still", "a vintage poster",
    "a ukiyo-e woodblock print", "an impressionist painting", "a low-poly render", "a children's book illustration",
    "a cinematic still",
]
DETAILS = [
    "highly detailed", "soft lighting", "dramatic lighting", "shallow depth of field", "wide angle",
    "close-up", "muted colors", "vibrant colors", "high contrast", "pastel palette", "symmetrical composition",
    "rule of thirds",
]


BUILTIN_COUNT = 2400  # the data-free prompt list; the shuffled prompts after it are keep-best's, never drawn


def builtin_prompts(count=BUILTIN_COUNT, seed=0, start=0):
    """`count` distinct prompts '<style> of <subject> <setting>, <detail>' from position `start` of one deterministic
    shuffle (so the prompts after the first BUILTIN_COUNT are none of the list's)."""
    combos = list(itertools.product(STYLES, SUBJECTS, SETTINGS))
    rng = random.Random(seed)
    rng.shuffle(combos)
    if start + count > len(combos):
        raise ValueError(f"the built-in list has at most {len(combos)} prompts; asked for {start + count}")
    prompts = [f"{style} of {subject} {setting}, {rng.choice(DETAILS)}" for style, subject, setting in combos]
    return prompts[start : start + count]


def read_prompt_file(path):
    """One prompt per non-empty line of a UTF-8 text file; a clear UserError if it is unreadable or empty."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file {path} does not exist; give a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"prompt file {path} cannot be read as UTF-8 text: {error}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts; write one prompt per line")
    return prompts
