"""API-format <-> UI-format (litegraph) workflows, from ComfyUI's own node definitions, and their thumbnails.

`python tests/nodes/workflow_ui.py` (with a ComfyUI checkout where the tests find one) writes
workflows/<name>.json from workflows/api/<name>.json, and workflows/<name>.jpg where there is none (SUBTITLES says
what it shows); the tests convert each UI file back and compare."""

import json
import sys
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
REPO = Path(__file__).resolve().parents[2]
SUBTITLES = {
    "scott_sdxl_txt2img": "1024 px, 4 steps, cfg 1",
    "scott_sdxl_img2img": "4 steps, denoise 0.6",
}
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
COLORS = {"background": (24, 28, 39), "title": (240, 194, 96), "subtitle": (180, 192, 212), "node": (68, 79, 95),
          "scott": (88, 151, 231), "text": (255, 255, 255)}


def node_definition(cls):
    """{"inputs": [(name, type, is_widget, extra widget values)], "outputs": [(name, type)]} of a class."""
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            io_type, opts = entry[0], (entry[1] if len(entry) > 1 else {}) or {}
            is_widget = isinstance(io_type, list) or io_type in WIDGET_TYPES
            extra = []
            if io_type == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                extra = ["fixed"]
            if opts.get("image_upload"):
                extra = ["image"]
            inputs.append((name, "COMBO" if isinstance(io_type, list) else io_type, is_widget, extra))
    types = list(cls.RETURN_TYPES)
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    return {"inputs": inputs, "outputs": list(zip(names, types))}


def _depths(api):
    depth = {}

    def visit(node_id):
        if node_id not in depth:
            parents = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((visit(p) for p in parents), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def api_to_ui(api, classes):
    """A UI-format workflow (litegraph version 0.4) of an API-format prompt, laid out in columns by depth."""
    depth, rows, links, nodes = _depths(api), {}, [], []
    defs = {nid: node_definition(classes[n["class_type"]]) for nid, n in api.items()}
    out_links = {nid: {} for nid in api}
    for nid, node in api.items():
        for name, _, is_widget, _ in defs[nid]["inputs"]:
            value = node["inputs"].get(name)
            if isinstance(value, list) and not is_widget:
                link_id = len(links) + 1
                src, slot = value
                links.append([link_id, int(src), slot, int(nid), None, defs[src]["outputs"][slot][1]])
                out_links[src].setdefault(slot, []).append(link_id)
    by_target = {(link[3], link[0]): link for link in links}
    order = sorted(api, key=lambda n: (depth[n], int(n)))
    for index, nid in enumerate(order):
        node, d = api[nid], defs[nid]
        row = rows.get(depth[nid], 0)
        rows[depth[nid]] = row + 1
        ui_inputs, widgets = [], []
        for name, io_type, is_widget, extra in d["inputs"]:
            value = node["inputs"].get(name)
            if is_widget:
                widgets += [value, *extra]
            elif isinstance(value, list):
                link_id = next(
                    lid
                    for (target, lid), lk in by_target.items()
                    if target == int(nid) and lk[1] == int(value[0]) and lk[2] == value[1] and lk[4] is None
                )
                by_target[(int(nid), link_id)][4] = len(ui_inputs)
                ui_inputs.append({"name": name, "type": io_type, "link": link_id})
        outputs = [
            {"name": name, "type": t, "links": out_links[nid].get(slot, []), "slot_index": slot}
            for slot, (name, t) in enumerate(d["outputs"])
        ]
        nodes.append(
            {
                "id": int(nid),
                "type": node["class_type"],
                "pos": [40 + 380 * depth[nid], 40 + 260 * row],
                "size": [340, 120 + 26 * len(widgets)],
                "flags": {},
                "order": index,
                "mode": 0,
                "inputs": ui_inputs,
                "outputs": outputs,
                "properties": {"Node name for S&R": node["class_type"]},
                "widgets_values": widgets,
            }
        )
    return {
        "last_node_id": max(int(n) for n in api),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def ui_to_api(ui, classes):
    """The API-format prompt a UI-format workflow stands for (links resolved, widget values named)."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in UI_ONLY_TYPES:
            continue
        d = node_definition(classes[node["type"]])
        values, inputs = list(node.get("widgets_values", [])), {}
        for name, _, is_widget, extra in d["inputs"]:
            if is_widget:
                inputs[name] = values.pop(0)
                del values[: len(extra)]
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def draw_thumbnail(api, title, subtitle, path):
    """A 512 x 384 JPEG: the title, a subtitle and the graph's nodes (text encoders left out) in two columns, SCott's
    nodes in blue."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (512, 384), COLORS["background"])
    draw = ImageDraw.Draw(image)
    draw.text((24, 18), title, font=ImageFont.truetype(FONT, 32), fill=COLORS["title"])
    draw.text((24, 64), subtitle, font=ImageFont.truetype(FONT, 18), fill=COLORS["subtitle"])
    types = [api[n]["class_type"] for n in sorted(api, key=int) if api[n]["class_type"] != "CLIPTextEncode"]
    for i, class_type in enumerate(types):
        x, y = 24 + 244 * (i % 2), 104 + 52 * (i // 2)
        scott = class_type.startswith("Scott")
        draw.rounded_rectangle((x, y, x + 220, y + 40), 8, fill=COLORS["scott" if scott else "node"])
        label = class_type.replace("Scott", "SCott ", 1) if scott else class_type
        draw.text((x + 10, y + 11), label, font=ImageFont.truetype(FONT, 15), fill=COLORS["text"])
    image.save(path, quality=90)


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    from comfy_harness import find_comfyui, import_comfyui

    import_comfyui(find_comfyui())
    import asyncio

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    asyncio.run(nodes.load_custom_node(str(REPO)))
    for api_file in sorted((REPO / "workflows" / "api").glob("*.json")):
        ui = api_to_ui(json.loads(api_file.read_text()), nodes.NODE_CLASS_MAPPINGS)
        (REPO / "workflows" / api_file.name).write_text(json.dumps(ui, indent=2) + "\n")
        print("wrote", REPO / "workflows" / api_file.name)
        thumbnail = (REPO / "workflows" / api_file.name).with_suffix(".jpg")
        if not thumbnail.exists():
            title = "SCott " + api_file.stem.removeprefix("scott_").replace("sdxl_", "SDXL ")
            draw_thumbnail(json.loads(api_file.read_text()), title, SUBTITLES[api_file.stem], thumbnail)
            print("wrote", thumbnail)


if __name__ == "__main__":
    main()
