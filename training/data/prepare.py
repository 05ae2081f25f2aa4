"""The --data sources that need work before they are images: the shapes world rendered into a folder, data-free
teacher images drawn into one."""

import logging
from pathlib import Path

from .images import PairDataset
from .sources import ImageFolder
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

