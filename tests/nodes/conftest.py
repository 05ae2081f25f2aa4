"""ComfyUI in this process, as ComfyUI itself runs a prompt: the node pack loaded by nodes.load_custom_node,
prompts checked by execution.validate_prompt and run by execution.PromptExecutor. Skips without a checkout."""

import asyncio
import shutil
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
import scott_fixtures  # noqa: E402


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
    """A ComfyUI instance in this process, with fixture folders for checkpoints, loras and outputs."""

    def __init__(self, root, paths, work):
        import comfy.utils
        import execution
        import folder_paths

        import nodes

        for folder, key in (
            ("checkpoints", "checkpoint"),
            ("loras", "lora_kohya"),
            ("diffusion_models", "sd2_unet"),
        ):
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


@pytest.fixture(scope="session")
def comfy_modules(comfyui_path):
    """ComfyUI importable in this process, on the CPU (its modules read these flags when first imported)."""
    from comfy.cli_args import LatentPreviewMethod, args

    args.cpu = True
    args.preview_method = LatentPreviewMethod.Latent2RGB
    import utils.install_util  # noqa: F401  (must precede `import nodes`, see COMFYUI_NOTES.md)

    return comfyui_path


@pytest.fixture(scope="session")
def fixture_paths(comfy_modules, cache_dir):
    """The fixture files, built on a cold cache (about 10 s) and reused after."""
    return scott_fixtures.build_all(cache_dir)


@pytest.fixture(scope="session")
def comfy(comfy_modules, fixture_paths, tmp_path_factory):
    """ComfyUI with the SCott pack loaded; fails if the pack's four nodes are not registered."""
    instance = Comfy(comfy_modules, fixture_paths, tmp_path_factory.mktemp("comfy"))
    assert instance.pack_loaded, "nodes.load_custom_node could not load the repository as a node pack"
    yield instance
    shutil.rmtree(instance.output_dir, ignore_errors=True)
