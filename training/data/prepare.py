"""The --data sources that need work before they are images: the shapes world rendered into a folder, data-free
teacher images drawn into one; and what each source withholds for keep-best (holdout.py)."""

import logging
from pathlib import Path

from . import holdout
from .buckets import bucket_rules, bucketable
from .images import PairDataset
from .sources import ImageFolder, World
from .synth import synthesize_run

log = logging.getLogger("training")


def world_folder(world, output, accelerator):
    """'world:N' / 'diverse:N': the first N shapes-world images (seed 0) rendered once into <output>/world (or
    <output>/diverse), as an ImageFolder."""
    from .scenes import write_folder

    folder = Path(output) / world.folder
    if accelerator.is_main_process:
        write_folder(folder, world.count, world=world.world)
    accelerator.wait_for_everyone()
    return ImageFolder(folder)


def synthetic_dataset(cfg, accelerator, teacher, prompts):
    """Data-free: every process draws its shard of the teacher images, then all read the whole folder."""
    folder, made = synthesize_run(
        cfg, teacher, prompts, accelerator.device,
        accelerator.process_index, accelerator.num_processes,
    )
    accelerator.wait_for_everyone()
    log.info(
        "data-free: rank %d drew %d new teacher images into %s (%d in the run)",
        accelerator.process_index, made, folder, cfg.synth_images,
    )
    return PairDataset(ImageFolder(Path(folder)), cfg.resolution)



def training_data(cfg, accelerator):
    """(dataset, data-free prompts, Holdout or None) before the teacher loads: the user's pairs less the withheld
    ones, or the world's folder (its validation scenes apart), or (data-free, dataset None) the prompts to draw less
    those withheld; --validation-data replaces what a source would withhold (its split is then '0')."""
    dataset, prompts, held = _source_data(cfg, accelerator)
    if cfg.validation_data:
        held = holdout.from_data(cfg.validation_data, cfg.resolution)
    return dataset, prompts, held


def _source_data(cfg, accelerator):
    source, spec = cfg.source, cfg.validation_split
    if source.data_free:
        prompts, held = holdout.split_prompts(source, source.prompts(), spec, cfg.seed)
        return None, prompts, held
    held = None
    if isinstance(source, World):
        held = holdout.world_scenes(source, spec, cfg.resolution)
        source = world_folder(source, cfg.output, accelerator)
    withhold = holdout.pair_splitter(spec, cfg.seed) if bucketable(cfg.source) else None
    dataset = PairDataset(source, cfg.resolution, bucket_rules(cfg), withhold)
    if dataset.withheld:
        origin = f"{len(dataset.withheld)} image pairs of {source} withheld by --validation-split {spec}"
        held = holdout.from_pairs(dataset.withheld, cfg.resolution, origin)
    return dataset, None, held
