"""Diagnostic (untracked): first-call time of SDPA per shape, and the backend torch picks."""
import time
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

dev = "cuda"
print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.get_device_name())


def run(n, start, label):
    H, D = 32, 128
    q = torch.randn(1, H, n, D, device=dev, dtype=torch.float16)
    k = torch.randn(1, H, start + n, D, device=dev, dtype=torch.float16)
    v = torch.randn_like(k)
    if start == 0:
        kw = dict(is_causal=True)
    else:
        rows = torch.arange(n, device=dev)[:, None] + start
        kw = dict(attn_mask=torch.arange(start + n, device=dev)[None, :] <= rows)
    try:
        choice = torch._fused_sdp_choice(q, k, v, **kw)
    except Exception as e:
        choice = repr(e)[:60]
    ts = []
    for _ in range(2):
        torch.cuda.synchronize(); t = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, **kw)
        torch.cuda.synchronize(); ts.append(round((time.perf_counter() - t) * 1e3, 2))
    print(label, "n", n, "start", start, "ms first/second", ts, "backend", choice, flush=True)


for s in [(512, 0), (37, 0), (512, 512), (45, 517), (64, 1040), (95, 1024), (80, 1119), (200, 3000), (33, 1500), (512, 1024)]:
    run(*s, "default")
with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
    for s in [(77, 2000), (51, 1234), (300, 700)]:
        run(*s, "no-cudnn")
for s in [(77, 2000), (51, 1234), (300, 700), (78, 2001)]:
    run(*s, "default-new")
with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
    for s in [(79, 2100), (52, 1334)]:
        run(*s, "efficient")
