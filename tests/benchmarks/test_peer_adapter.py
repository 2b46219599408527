"""The peer's adapter against fake checkouts with the real one's layout (its loader module and
``topk``): the build runs the checkout's own loader in a child process, reports its failure by
the log's last line, and ``load`` returns the checkout's ``topk``. No CUDA, no nvcc."""

import sys

import pytest

from benchmarks import peer_approx_topk as adapter


def fake_checkout(tmp_path, loader_body: str):
    package = tmp_path / "approx_topk"
    package.mkdir()
    (package / "priority_queue_approx_topk.cu").write_text("// the kernel")
    (package / "cuda_extensions.py").write_text(
        "import os\n"
        "def load_cuda_extension(file_name, compile_mode):\n" + loader_body)
    (package / "__init__.py").write_text("def topk(xs, k, dim, j=1, k_mult=1, interleaved=True, multithread_buckets=False):\n"
                                         "    return 'peer topk', k\n")
    return tmp_path


def test_build_runs_the_checkouts_loader_into_its_build_folder(tmp_path):
    checkout = fake_checkout(tmp_path, "    print('built for', os.environ['TORCH_CUDA_ARCH_LIST'], compile_mode)\n"
                                       "    open(os.path.join(os.environ['TORCH_EXTENSIONS_DIR'], 'done'), 'w')\n")
    build = adapter.BackgroundBuild(checkout, arch="9.0")
    assert build.wait(60) is None
    assert build.last_line() == "built for 9.0 optimize"
    assert (checkout / adapter.BUILD_DIR / "done").exists()


def test_a_failed_build_says_why(tmp_path):
    checkout = fake_checkout(tmp_path, "    raise RuntimeError('nvcc fatal: unsupported gpu architecture')\n")
    error = adapter.BackgroundBuild(checkout, arch="9.0").wait(60)
    assert error == "build failed (exit 1): RuntimeError: nvcc fatal: unsupported gpu architecture"


def test_a_build_past_its_time_is_stopped(tmp_path):
    checkout = fake_checkout(tmp_path, "    import time\n    time.sleep(60)\n")
    assert adapter.BackgroundBuild(checkout, arch="9.0").wait(0.5) == "build still running after 0 s: stopped"


def test_not_a_checkout_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch-approx-topk"):
        adapter.BackgroundBuild(tmp_path)


def test_load_returns_the_checkouts_topk(tmp_path, monkeypatch):
    checkout = fake_checkout(tmp_path, "    pass\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "approx_topk", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    topk = adapter.load(checkout)
    assert topk(None, 7, -1) == ("peer topk", 7)
    assert adapter.build_environment(checkout)["TORCH_EXTENSIONS_DIR"] == str(checkout.resolve() / adapter.BUILD_DIR)
    sys.modules.pop("approx_topk", None)
