#!/usr/bin/env python3
"""Stock PyTorch on CUDA, checked against the same work on the CPU.

PyTorch loads its own libcudart.so (from the nvidia-cuda-runtime wheel), which
dlopens libcuda.so.1: with LD_LIBRARY_PATH pointing at the gpupool stub this
runs unchanged against a remote GPU. Lines starting with TIME or INFO may
differ between runs; the rest is deterministic for a given GPU.
"""
import sys
import time

NAME = "torch_check"


def fail(reason):
    print(f"FAIL {NAME}: {reason}", flush=True)
    sys.exit(1)


def main():
    try:
        import torch
    except ImportError as e:
        fail(f"import torch: {e}")

    print(f"INFO torch {torch.__version__}, built for CUDA {torch.version.cuda}")
    available = torch.cuda.is_available()
    print(f"cuda available: {available}")
    if not available:
        fail("torch.cuda.is_available() is False")
    print(f"INFO device count: {torch.cuda.device_count()}")
    print(f"device 0: {torch.cuda.get_device_name(0)}")
    major, minor = torch.cuda.get_device_capability(0)
    print(f"compute capability {major}.{minor}")

    # TF32 would make the GPU matmul differ from the CPU's by more than
    # float32 rounding; the check is about the transport, not the precision.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    dev = torch.device("cuda:0")
    gen = torch.Generator().manual_seed(1234)
    a = torch.randn(1024, 1024, generator=gen)
    b = torch.randn(1024, 1024, generator=gen)
    t0 = time.perf_counter()
    c_gpu = (a.to(dev) @ b.to(dev)).cpu()
    print(f"TIME 1024x1024 matmul incl. transfers: "
          f"{(time.perf_counter() - t0) * 1e3:.1f} ms")
    c_cpu = a @ b
    if not torch.allclose(c_gpu, c_cpu, rtol=1e-4, atol=1e-3):
        diff = (c_gpu - c_cpu).abs().max().item()
        fail(f"matmul: GPU and CPU differ by up to {diff}")
    print("matmul 1024x1024: GPU matches CPU")

    # A small MLP, one forward/backward/SGD step on each device from the same
    # initial weights and data.
    def mlp_step(device):
        torch.manual_seed(42)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 10),
        ).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(7)
        x = torch.randn(32, 64, generator=g).to(device)
        y = torch.randint(0, 10, (32,), generator=g).to(device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad.detach().cpu().clone() for p in model.parameters()]
        opt.step()
        params = [p.detach().cpu().clone() for p in model.parameters()]
        return loss.item(), grads, params

    loss_cpu, grads_cpu, params_cpu = mlp_step(torch.device("cpu"))
    loss_gpu, grads_gpu, params_gpu = mlp_step(dev)
    if abs(loss_cpu - loss_gpu) > 1e-5 * max(1.0, abs(loss_cpu)):
        fail(f"MLP loss: GPU {loss_gpu} vs CPU {loss_cpu}")
    for i, (gc, gg) in enumerate(zip(grads_cpu, grads_gpu)):
        if not torch.allclose(gc, gg, rtol=1e-4, atol=1e-5):
            fail(f"MLP gradient {i} differs by up to {(gc - gg).abs().max().item()}")
    for i, (pc, pg) in enumerate(zip(params_cpu, params_gpu)):
        if not torch.allclose(pc, pg, rtol=1e-4, atol=1e-5):
            fail(f"MLP parameter {i} after SGD differs by up to "
                 f"{(pc - pg).abs().max().item()}")
    # Rounded so that float noise between GPUs does not reach the output.
    print(f"MLP step: loss {loss_cpu:.4f} on both devices, "
          f"gradients and updated parameters match")

    torch.cuda.synchronize()
    print(f"PASS {NAME}")


if __name__ == "__main__":
    main()
