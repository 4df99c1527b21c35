"""Save node: IMAGE frames + fps -> mp4 in ComfyUI's output folder, shown in the UI."""
from __future__ import annotations

import os
from fractions import Fraction

import folder_paths
from comfy_api.latest import InputImpl, Types, io, ui

from . import common as C


class CogVidSaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CogVidSaveVideo",
            display_name="CogVideoX I2V Save Video (mp4)",
            category=f"{C.CATEGORY}/video",
            description="Writes the frames as an H.264 mp4 into ComfyUI's output folder (written under a "
                        "temporary name, then renamed) and shows it in the UI.",
            inputs=[
                io.Image.Input("images", tooltip="Frames [T,H,W,C] from CogVideoX I2V Decode (or any IMAGE batch)"),
                io.Float.Input("fps", default=16.0, min=1.0, max=120.0, step=1.0,
                               tooltip="Frames per second (CogVideoX1.5: 16, CogVideoX-5B-I2V: 8); "
                                       "connect Decode's fps output"),
                io.String.Input("filename_prefix", default="CogVideoX/i2v",
                                tooltip="File name prefix inside the output folder; may contain sub-folders"),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, fps, filename_prefix) -> io.NodeOutput:
        from cogvid_core.api import write_mp4
        out_dir = folder_paths.get_output_directory()
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, out_dir, images.shape[2], images.shape[1])
        file = f"{filename}_{counter:05}_.mp4"
        write_mp4(images[..., :3], os.path.join(folder, file), fps)
        return io.NodeOutput(ui=ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]))


def as_video(frames, fps: float):
    """IMAGE frames + fps as core's VIDEO, so core's Save Video / Get Video Components connect.
    The frames are shared, not copied; NTSC-like rates (23.976) keep a small exact fraction."""
    rate = Fraction(float(fps)).limit_denominator(1001)
    return InputImpl.VideoFromComponents(Types.VideoComponents(images=frames, frame_rate=rate))


NODES = [CogVidSaveVideo]
