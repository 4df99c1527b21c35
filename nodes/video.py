"""Save node: IMAGE frames + fps -> mp4 in ComfyUI's output folder, shown in the UI."""
from __future__ import annotations

import os
from fractions import Fraction

import folder_paths
from comfy_api.latest import InputImpl, Types, io, ui

from . import common as C


AUTO_FPS = 0.0


def rate_for(frames: int) -> float:
    """The frame rate a CogVideoX video of this many frames was made for: CogVideoX-5B-I2V makes at most
    its 49 frames (learned positions), so a longer video is CogVideoX1.5's; 49 or fewer is taken as 5B's."""
    from cogvid_core.api import VARIANTS
    v10, v15 = VARIANTS["cogvideox-5b-i2v"], VARIANTS["cogvideox1.5-5b-i2v"]
    return float(v15.fps if frames > v10.default_frames else v10.fps)


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
                # 0 = from the frame count: an IMAGE batch carries no frame rate, and a fixed 16 played
                # CogVideoX-5B-I2V's 8 fps videos twice as fast once the fps wire was removed
                io.Float.Input("fps", default=AUTO_FPS, min=AUTO_FPS, max=120.0, step=1.0,
                               tooltip="Frames per second; connect Decode's fps output. 0: from the frame count "
                                       "(IMAGE frames carry no rate): up to 49 frames 8 fps (CogVideoX-5B-I2V), "
                                       "more 16 fps (CogVideoX1.5)"),
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
        write_mp4(images[..., :3], os.path.join(folder, file), fps if fps > AUTO_FPS else rate_for(images.shape[0]))
        return io.NodeOutput(ui=ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]))


def as_video(frames, fps: float):
    """IMAGE frames + fps as core's VIDEO, so core's Save Video / Get Video Components connect.
    The frames are shared, not copied; NTSC-like rates (23.976) keep a small exact fraction."""
    rate = Fraction(float(fps)).limit_denominator(1001)
    return InputImpl.VideoFromComponents(Types.VideoComponents(images=frames, frame_rate=rate))


NODES = [CogVidSaveVideo]
