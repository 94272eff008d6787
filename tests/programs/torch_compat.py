#!/usr/bin/env python3
"""Stock PyTorch workloads that real users run, each checked on its own.

Run natively and through gpupool's libcuda.so.1 in the same GPU-suite run;
both runs must print the same non-TIME/INFO lines. Every case compares the
GPU's result with a reference computed on the CPU (fp32 or fp64), with a
tolerance suited to its precision, and prints one deterministic line; a case
that raises prints `FAIL <case>: <error>` and the script goes on, so one
missing feature does not hide the others. Exit status 1 when any case failed.

Cases (select some with `TORCH_COMPAT_CASES=name,name`):
  fp32_infer, bf16_infer, fp16_infer   transformer encoder forward, autocast
  fp32_train, bf16_train, fp16_train   one training step (GradScaler for fp16)
  fft                                  cuFFT through torch.fft (1-D, 2-D, real)
  compile                              torch.compile (Inductor/Triton) of an MLP
  graphs                               torch.cuda.CUDAGraph capture and replay
  mallocasync                          (run separately with the cudaMallocAsync
                                       allocator: see bench/dropin.sh)
"""
import os
import sys
import time
import traceback

NAME = "torch_compat"
failed = []


def case(name):
    wanted = os.environ.get("TORCH_COMPAT_CASES")

    def wrap(fn):
        if wanted and name not in wanted.split(","):
            return fn
        t0 = time.perf_counter()
        try:
            line = fn()
            print(f"{name}: {line}", flush=True)
        except Exception as e:  # noqa: BLE001 - each case reports its own failure
            failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            traceback.print_exc(file=sys.stderr)
        print(f"TIME {name}: {(time.perf_counter() - t0) * 1e3:.1f} ms", flush=True)
        return fn

    return wrap


def close(got, want, rtol, atol, what):
    import torch

    got = got.detach().float().cpu()
    want = want.detach().float().cpu()
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: non-finite values on the GPU")
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        err = (got - want).abs().max().item()
        raise AssertionError(f"{what}: differs from the CPU reference by up to {err:.3g}")


def main():
    import torch

    print(f"INFO torch {torch.__version__}, CUDA {torch.version.cuda}")
    if not torch.cuda.is_available():
        print(f"FAIL {NAME}: torch.cuda.is_available() is False")
        sys.exit(1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda:0")

    def encoder(seed=0):
        torch.manual_seed(seed)
        layer = torch.nn.TransformerEncoderLayer(
            d_model=256, nhead=8, dim_feedforward=1024, dropout=0.0, batch_first=True
        )
        return torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def batch(seed=1):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(4, 64, 256, generator=g)

    def infer(dtype, rtol, atol):
        cpu_model = encoder().eval()
        gpu_model = encoder().to(dev).eval()
        x = batch()
        with torch.no_grad():
            want = cpu_model(x)
            if dtype is None:
                got = gpu_model(x.to(dev))
            else:
                with torch.autocast("cuda", dtype=dtype):
                    got = gpu_model(x.to(dev))
        torch.cuda.synchronize()
        close(got, want, rtol, atol, "output")
        return f"output {tuple(got.shape)} matches the CPU (rtol {rtol}, atol {atol})"

    case("fp32_infer")(lambda: infer(None, 1e-3, 1e-3))
    case("bf16_infer")(lambda: infer(torch.bfloat16, 0.1, 0.15))
    case("fp16_infer")(lambda: infer(torch.float16, 0.02, 0.03))

    def train(dtype, rtol, atol):
        cpu_model, gpu_model = encoder(), encoder().to(dev)
        x = batch()
        target = batch(seed=2)
        cpu_opt = torch.optim.SGD(cpu_model.parameters(), lr=0.01)
        gpu_opt = torch.optim.SGD(gpu_model.parameters(), lr=0.01)
        loss_cpu = torch.nn.functional.mse_loss(cpu_model(x), target)
        loss_cpu.backward()
        cpu_opt.step()
        xg, tg = x.to(dev), target.to(dev)
        if dtype is None:
            loss = torch.nn.functional.mse_loss(gpu_model(xg), tg)
            loss.backward()
            gpu_opt.step()
        else:
            scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
            with torch.autocast("cuda", dtype=dtype):
                loss = torch.nn.functional.mse_loss(gpu_model(xg).float(), tg)
            scaler.scale(loss).backward()
            scaler.step(gpu_opt)
            scaler.update()
        torch.cuda.synchronize()
        close(loss.reshape(1), loss_cpu.reshape(1), rtol, atol, "loss")
        for (name, pc), pg in zip(cpu_model.named_parameters(), gpu_model.parameters()):
            close(pg, pc, rtol, atol, f"parameter {name} after the step")
        return f"loss {loss_cpu.item():.3f}, parameters after one step match the CPU"

    case("fp32_train")(lambda: train(None, 1e-3, 1e-4))
    case("bf16_train")(lambda: train(torch.bfloat16, 0.05, 2e-3))
    case("fp16_train")(lambda: train(torch.float16, 0.02, 5e-4))

    @case("fft")
    def _fft():
        g = torch.Generator().manual_seed(3)
        x = torch.randn(8, 1000, generator=g, dtype=torch.float64).float()
        close(torch.fft.fft(x.to(dev)).abs(), torch.fft.fft(x).abs(), 1e-3, 1e-3, "fft")
        y = torch.randn(64, 48, generator=g)
        close(torch.fft.rfft2(y.to(dev)).abs(), torch.fft.rfft2(y).abs(), 1e-3, 1e-3, "rfft2")
        z = torch.fft.ifft(torch.fft.fft(x.to(dev)))
        close(z.real, x, 1e-4, 1e-4, "ifft(fft(x))")
        return "fft, rfft2 and ifft(fft) match the CPU"

    @case("compile")
    def _compile():
        torch.manual_seed(5)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32), torch.nn.LayerNorm(32)
        )
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
        want = model(x)
        compiled = torch.compile(model.to(dev))
        got = compiled(x.to(dev))
        got2 = compiled(x.to(dev) * 2)
        torch.cuda.synchronize()
        close(got, want, 1e-3, 1e-3, "compiled output")
        close(got2, model.cpu()(x * 2), 1e-3, 1e-3, "compiled output, second call")
        return "torch.compile (Inductor/Triton) output matches eager on the CPU"

    @case("graphs")
    def _graphs():
        torch.manual_seed(7)
        lin = torch.nn.Linear(128, 128).to(dev)
        static_in = torch.zeros(32, 128, device=dev)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                lin(static_in).relu()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = lin(static_in).relu() * 2
        w, b = lin.weight.detach().cpu(), lin.bias.detach().cpu()
        for seed in range(3):
            x = torch.randn(32, 128, generator=torch.Generator().manual_seed(100 + seed))
            static_in.copy_(x.to(dev))
            graph.replay()
            torch.cuda.synchronize()
            close(static_out, (x @ w.T + b).relu() * 2, 1e-3, 1e-3, f"replay {seed}")
        return "CUDA graph captured once, 3 replays match the CPU"

    torch.cuda.synchronize()
    if failed:
        print(f"FAIL {NAME}: {len(failed)} case(s) failed: {', '.join(failed)}")
        sys.exit(1)
    print(f"PASS {NAME}")


if __name__ == "__main__":
    main()
