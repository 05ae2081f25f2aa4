"""ComfyUI in this process, as ComfyUI itself runs a prompt, for the tests and the benchmarks alike: where a ComfyUI
checkout is, importing it, the node pack loaded by nodes.load_custom_node, prompts checked by
execution.validate_prompt and run by execution.PromptExecutor. Imports no pytest."""

import asyncio
import configparser
import os
import platform
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def comfy_cli_workspaces():
    """The ComfyUI folders comfy-cli would use: its config's default and recent workspace, then its OS default."""
    home = Path.home()
    if platform.system() == "Windows":
        config_dir, default = home / "AppData" / "Local" / "comfy-cli", home / "Documents" / "comfy" / "ComfyUI"
    elif platform.system() == "Darwin":
        config_dir = home / "Library" / "Application Support" / "comfy-cli"
        default = home / "Documents" / "comfy" / "ComfyUI"
    else:
        config_dir, default = home / ".config" / "comfy-cli", home / "comfy" / "ComfyUI"
    config = configparser.ConfigParser()
    try:
        config.read(config_dir / "config.ini")  # a missing file reads as empty
    except configparser.Error:
        pass
    chosen = (config["DEFAULT"].get(key) for key in ("default_workspace", "recent_workspace"))
    return [Path(p).expanduser() for p in chosen if p] + [default]


def find_comfyui():
    """COMFYUI_PATH, else comfy-cli's workspace (configured, recent, ~/comfy/ComfyUI), else a checkout above the
    repository (the custom_nodes/ install); None where there is none."""
    candidates = [os.environ.get("COMFYUI_PATH"), *comfy_cli_workspaces(), Path.home() / "comfy" / "ComfyUI"]
    for candidate in [*candidates, *REPO.parents]:
        if candidate and (Path(candidate) / "comfy" / "model_sampling.py").is_file():
            return Path(candidate)
    return None


def fixture_cache_dir():
    """Where slow-built fixtures are cached: $SCOTT_TEST_CACHE, default ~/.cache/comfyui-scott-tests."""
    path = Path(os.environ.get("SCOTT_TEST_CACHE", Path.home() / ".cache" / "comfyui-scott-tests"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def import_comfyui(path, cpu=True, previews=True):
    """ComfyUI importable in this process; sets the flags its modules read when first imported."""
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    from comfy.cli_args import LatentPreviewMethod, args

    args.cpu = cpu
    if previews:
        args.preview_method = LatentPreviewMethod.Latent2RGB
    import utils.install_util  # noqa: F401  (must precede `import nodes`, see COMFYUI_NOTES.md)

    return Path(path)


class MessageLog:
    """The executor's outlet for server messages (what the web server would send over its websocket)."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class Comfy:
    """A ComfyUI instance in this process (import_comfyui first), with fixture folders for checkpoints, loras
    and outputs (the SD1.5 and, where given, SDXL fixtures) and this repository loaded as a node pack."""

    def __init__(self, paths, work):
        import comfy.utils
        import execution
        import folder_paths

        import nodes

        for folder, key in (
            ("checkpoints", "checkpoint"),
            ("loras", "lora_kohya"),
            ("diffusion_models", "sd2_unet"),
            ("checkpoints", "sdxl_checkpoint"),
            ("loras", "sdxl_lora_kohya"),
            ("diffusion_models", "sdxl_vpred_unet"),
        ):
            if key in paths:
                folder_paths.add_model_folder_path(folder, str(paths[key].parent), is_default=True)
        self.output_dir, self.input_dir = work / "output", work / "input"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.input_dir.mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(self.output_dir))
        folder_paths.set_input_directory(str(self.input_dir))
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        self.pack_loaded = asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes"))
        self.nodes, self.execution, self.folder_paths = nodes, execution, folder_paths
        self.progress = []
        comfy.utils.set_progress_bar_global_hook(self._progress_hook)
        self.log = MessageLog()
        self.executor = execution.PromptExecutor(self.log, cache_type=execution.CacheType.CLASSIC)
        self.interrupt_at_step = None

    @staticmethod
    def pack(module):
        """A module of the loaded node pack, e.g. pack("nodes.sampler") (ComfyUI names it by its path)."""
        return sys.modules[f"{str(REPO).replace('.', '_x_')}.{module}"]

    def _progress_hook(self, value, total, preview, node_id=None, **kwargs):
        import comfy.model_management
        from comfy_execution.utils import get_executing_context

        if node_id is None and get_executing_context() is not None:  # as main.py's hook finds the node
            node_id = get_executing_context().node_id
        self.progress.append((node_id, value, total, preview is not None))
        if self.interrupt_at_step is not None and value >= self.interrupt_at_step:
            self.nodes.interrupt_processing()
        comfy.model_management.throw_exception_if_processing_interrupted()  # what main.py's hook does

    def run(self, prompt):
        """Validate and execute an API-format prompt: {"ok", "error", "node_errors", "outputs", ...}."""
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(
            self.execution.validate_prompt(prompt_id, prompt, None)
        )
        if not valid:
            return {"ok": False, "stage": "validation", "error": error, "node_errors": node_errors}
        self.log.messages.clear()
        self.progress.clear()
        self.executor.execute(prompt, prompt_id, {}, outputs)
        messages = list(self.executor.status_messages)
        errors = [d for e, d in messages if e in ("execution_error", "execution_interrupted")]
        return {
            "ok": self.executor.success,
            "stage": "execution",
            "error": errors[0] if errors else None,
            "outputs": self.executor.history_result.get("outputs", {}),
            "messages": messages,
        }

    def output_files(self, result, kind="images", prefix=""):
        """Paths of the files a run's output nodes saved (SaveImage: "images", SaveLatent: "latents"), those
        whose name starts with prefix (the executor also reports outputs of nodes served from its cache)."""
        files = []
        for out in result["outputs"].values():
            for item in out.get(kind, []):
                if item["filename"].startswith(prefix):
                    files.append(self.output_dir / item.get("subfolder", "") / item["filename"])
        return sorted(files)
