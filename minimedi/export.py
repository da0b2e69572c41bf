"""Export a trained model to a self-contained folder: `python -m minimedi.export --run DIR --model aligned --out FOLDER`.

    FOLDER/config.json                 the run's config (with the diffusion settings), the UNet's architecture,
                                       the text encoder's CLIPConfig and the data the model learned from
    FOLDER/model.safetensors           the UNet's EMA weights
    FOLDER/text_encoder.safetensors    the CLIP the captions are encoded with (its OpenAI-named weights): the
                                       frozen one, or aligned.pt's tuned copy (`--lora-targets ...,text`)
    FOLDER/sr.safetensors              when the run has sr.pt: the cascade's super-resolution stage (EMA
                                       weights; its config, architecture and text dims under "sr" in config.json)
    FOLDER/sr_text_encoder.safetensors when the text encoder was tuned: the frozen CLIP the SR stage reads

Nothing in the folder depends on the machine or the run folder it came from: `python sample.py --model FOLDER`
samples from it anywhere. safetensors holds tensors only, so loading it runs no code.
"""
import dataclasses
import json
import os

from safetensors.torch import save_file

from minimedi.atomic import atomic_path
from minimedi.checkpoint import load_checkpoint
from minimedi.errors import UserError, run_main
from minimedi.flags import parse_config
from minimedi.pipeline import MAKES, SR_TEXT_ENCODER, checkpoint_text_encoder, load_text_encoder


def export_model(run_dir, which, out):
    """Write `out`/{config.json, model.safetensors, text_encoder.safetensors} from <run_dir>/<which>.pt."""
    path = os.path.join(run_dir, f"{which}.pt")
    if not os.path.exists(path):
        raise UserError(f"no {which} model at {path}: run `{MAKES[which]}` first (or pass --run DIR)")
    ckpt = load_checkpoint(path)
    clip = checkpoint_text_encoder(ckpt, run_dir).clip
    config = {"config": ckpt["config"], "architecture": ckpt["architecture"], "text_encoder": dataclasses.asdict(clip.config), "data": ckpt.get("data", {}), "source": which,
              **({"align": ckpt["align"], "target_shares": ckpt["target_shares"]} if "align" in ckpt else {})}
    os.makedirs(out, exist_ok=True)
    sr_path = os.path.join(run_dir, "sr.pt")
    if os.path.exists(sr_path):
        sr = load_checkpoint(sr_path)
        config["sr"] = {key: sr[key] for key in ("config", "architecture", "text", "data")}
        with atomic_path(os.path.join(out, "sr.safetensors")) as tmp:
            save_file({k: v.contiguous() for k, v in sr["ema"].items()}, tmp)
        if "text_encoder" in ckpt:  # the base reads a tuned CLIP; the SR stage was trained with the frozen one
            frozen = load_text_encoder(sr["text"]["clip"], run_dir).clip
            with atomic_path(os.path.join(out, SR_TEXT_ENCODER)) as tmp:
                save_file({k: v.contiguous() for k, v in frozen.state_dict().items()}, tmp)
    with atomic_path(os.path.join(out, "model.safetensors")) as tmp:
        save_file({k: v.contiguous() for k, v in ckpt["ema"].items()}, tmp)
    with atomic_path(os.path.join(out, "text_encoder.safetensors")) as tmp:
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp)
    with atomic_path(os.path.join(out, "config.json")) as tmp, open(tmp, "w") as f:
        json.dump(config, f, indent=2)  # written last: a folder with config.json is complete
    return out


SECTIONS = ("run", "sample")


def main(argv=None):
    cfg = parse_config(argv, SECTIONS,
                       description="python -m minimedi.export --run DIR --model diffusion|aligned --out FOLDER")
    if cfg.sample.model not in MAKES:
        raise UserError(f"--model {cfg.sample.model}: export diffusion or aligned")
    if not cfg.sample.out:
        raise UserError("give --out FOLDER: where to write the exported model")
    print(f"wrote {export_model(cfg.run_dir, cfg.sample.model, cfg.sample.out)}")


if __name__ == "__main__":
    run_main(main)
