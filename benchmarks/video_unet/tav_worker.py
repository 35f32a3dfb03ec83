"""Worker for bench_vs_tav.py: Tune-A-Video's original UNet3DConditionModel, run in its own venv.

Not run by hand: `bench_vs_tav.py` starts it as

    <tav-python> benchmarks/video_unet/tav_worker.py --tav-src <checkout of showlab/Tune-A-Video>

in a venv with diffusers 0.11.1, transformers 4.25.1, huggingface_hub<0.26, accelerate 0.15.0, numpy<2 and a
stub `torchvision.utils` (see RESULTS.md), and drives it with one JSON request per line on stdin; each answer is
one line on stdout starting with `TAV `. The model is Tune-A-Video's own code (`tuneavideo.models.unet`, imported
from the checkout, nothing of it copied here), inflated with its own `from_pretrained_2d` from the 2D UNet the
driver wrote; its train step is the one of `train_tuneavideo.py`: `attn1.to_q`, `attn2.to_q`, `attn_temp`
trainable, MSE, backward, clip_grad_norm_, AdamW step, zero_grad (no gradient checkpointing, as for ei2's rows).

Requests: {"cmd": "load", "model_dir", "inputs", "threads", "dump"}; {"cmd": "step", "frames"}; {"cmd": "quit"}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def answer(**kwargs):
    sys.stdout.write("TAV " + json.dumps(kwargs) + "\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tav-src", required=True, help="a checkout of showlab/Tune-A-Video")
    args = parser.parse_args()
    sys.path.insert(0, args.tav_src)
    import torch
    import torch.nn.functional as F
    from tuneavideo.models.unet import UNet3DConditionModel

    steps, model = {}, None
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "load":
            torch.set_num_threads(request["threads"])
            model = UNet3DConditionModel.from_pretrained_2d(request["model_dir"])
            model.train()
            inputs = torch.load(request["inputs"])
            # the inflated model before any step: its outputs and weights, so the driver can check that ei2's
            # tune-a-video recipe with these weights computes the same function
            with torch.no_grad():
                outs = {f: model(x, 500, text).sample for f, (x, text, _) in inputs.items()}
            torch.save({"outputs": outs, "state_dict": model.state_dict()}, request["dump"])
            model.requires_grad_(False)
            trainable = ("attn1.to_q", "attn2.to_q", "attn_temp")  # train_tuneavideo.py's trainable_modules
            for name, module in model.named_modules():
                if name.endswith(trainable):
                    for p in module.parameters():
                        p.requires_grad = True
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=3e-5)

            def make(x, text, target):
                def step():
                    pred = model(x, 500, text).sample
                    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    opt.zero_grad()
                return step

            steps = {f: make(*inputs[f]) for f in inputs}
            answer(ok=True, params=sum(p.numel() for p in params), torch=torch.__version__,
                   threads=torch.get_num_threads())
        elif request["cmd"] == "step":
            step = steps[request["frames"]]
            t0 = time.perf_counter()
            step()
            answer(t=time.perf_counter() - t0)
        elif request["cmd"] == "quit":
            answer(ok=True)
            return


if __name__ == "__main__":
    main()
