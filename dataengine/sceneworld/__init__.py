"""Scene world: a seeded synthetic world of rendered scenes with exact ground truth.

Sample data and a test fixture for the engine. Each image shows 1-3 groups of coloured
shapes on a background, under a lighting, in a style; its JSON holds the full `Scene`
(pixel boxes included), its caption names the attributes, and a share of samples are
edits (source image, instruction, target). Held-out (colour, shape) concepts never reach
train but do appear in pool and eval, so gap search and triage can be scored exactly.

    from dataengine.sceneworld import SceneWorldConfig, write_scene_world
    paths = write_scene_world("workspace/shards", SceneWorldConfig(seed=0))

Modules: `scene` (vocabulary, records, layout, random scenes and edits), `render`
(pixels), `captions` (captions and instructions), `world` (config, samples, shards).
"""

from .captions import COUNT_FORMS, caption_for, instruction_for
from .render import DEFAULT_FILL_POINT, FILL_POINT, encode_image, render
from .scene import (
    ARRANGEMENTS, BACKGROUNDS, COLOURS, EDIT_OPS, LIGHTINGS, PLURALS, POSITIONS, SHAPES, SIZES,
    STYLES, TEXTURES, Edit, Group, Scene, apply_edit, concept_present, position_of, sample_edit,
    sample_scene,
)
from .world import SOURCE, SceneWorldConfig, generate, make_sample, sample_seed, scene_rngs, write_scene_world

__all__ = [
    "ARRANGEMENTS", "BACKGROUNDS", "COLOURS", "COUNT_FORMS", "DEFAULT_FILL_POINT", "EDIT_OPS",
    "FILL_POINT", "LIGHTINGS", "PLURALS", "POSITIONS", "SHAPES", "SIZES", "SOURCE", "STYLES",
    "TEXTURES", "Edit", "Group", "Scene", "SceneWorldConfig", "apply_edit", "caption_for",
    "concept_present", "encode_image", "generate", "instruction_for", "make_sample",
    "position_of", "render", "sample_edit", "sample_scene", "sample_seed", "scene_rngs", "write_scene_world",
]
