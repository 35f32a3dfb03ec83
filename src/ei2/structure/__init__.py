"""Structure conditions (DESIGN §1.12): maps per frame (`maps`) and the ControlNet(s) that read them (`controlnet`).

    maps = ei2.structure.maps.canny(frames)                         # (f, h, w, 3) uint8
    control = StructureControl.make(controlnet, as_condition(maps), controlnet_conditioning_scale=1.0)
    pipe.edit(frames, "a red circle ...", "a red circle ... on a white background", control=control)
"""
from .controlnet import StructureControl, build_control, check_fits, load_controlnet
from .maps import KINDS, as_condition, canny, depth, layout, softedge, user_maps

__all__ = ["StructureControl", "build_control", "check_fits", "load_controlnet", "KINDS", "as_condition", "canny",
           "depth", "layout", "softedge", "user_maps"]
