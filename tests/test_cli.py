"""The `kiln` command as a user runs it."""
import subprocess
import sys


def run(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_help_reads_well():
    r = run("--help")
    assert r.returncode == 0
    for word in ("generate", "chat", "SmolLM2", "examples:"):
        assert word in r.stdout
    r = run("generate", "--help")
    assert "--max-tokens" in r.stdout and "--random-weights" in r.stdout


def test_generate_and_chat_on_embedded_model():
    r = run("generate", "--prompt", "The capital of France is", "--max-tokens", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    r = run("chat", "--max-tokens", "12", "--device", "cpu",
            stdin="What is the capital of France?\n/reset\nSay hello\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_bad_input_is_a_clear_error():
    r = run("generate", "--prompt", "x", "--top-p", "1.5", "--device", "cpu")
    assert r.returncode == 2 and "top_p must be in (0, 1]" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "--prompt", "x", "--model", "/no/such/model")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_generate_tensor_parallel_starts_and_stops_ray():
    """--tp 2 starts a local Ray cluster (no RAY_ADDRESS), runs two ranks, and leaves nothing behind."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "generate", "--prompt", "The capital of France is",
                        "--max-tokens", "4", "--device", "cpu", "--tp", "2", "--kv-cache-bytes", str(1 << 27)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
