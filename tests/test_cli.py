"""`jaxinfer generate` streams text, `jaxinfer quantize` saves a quantized model; bad input is one
clear line and a non-zero exit."""

import socket
import subprocess
import sys

import pytest

from hf_models import write_tiny, write_tokenizer
from jaxinfer.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_model")
    write_tiny("llama", d, vocab_size=300)
    write_tokenizer(d, 300)
    return d


def test_generate_streams_the_completion(model_dir, capsys):
    from jaxinfer import LLM, SamplingParams
    rc = main(["generate", "def add(a, b):", "--model", str(model_dir), "--max-tokens", "12"])
    assert rc == 0
    out = capsys.readouterr().out
    ref = LLM(str(model_dir)).generate("def add(a, b):", SamplingParams(temperature=0, max_tokens=12))[0]
    assert out == "def add(a, b):" + ref.outputs[0].text + "\n"


def test_generate_with_beams_prints_the_best_beam(model_dir, capsys):
    from jaxinfer import LLM, BeamSearchParams
    rc = main(["generate", "def add(a, b):", "--model", str(model_dir), "--max-tokens", "12", "--beam-width", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    llm = LLM(str(model_dir))
    best = llm.beam_search(["def add(a, b):"], BeamSearchParams(beam_width=3, max_tokens=12))[0].sequences[0]
    assert out == "def add(a, b):" + llm.get_tokenizer().decode(best.output_token_ids) + "\n"


def test_generate_with_a_repetition_penalty(model_dir, capsys):
    from jaxinfer import LLM, SamplingParams
    rc = main(["generate", "def add(a, b):", "--model", str(model_dir), "--max-tokens", "12",
               "--repetition-penalty", "1.4"])
    assert rc == 0
    ref = LLM(str(model_dir)).generate("def add(a, b):", SamplingParams(temperature=0, max_tokens=12,
                                                                         repetition_penalty=1.4))[0]
    assert capsys.readouterr().out == "def add(a, b):" + ref.outputs[0].text + "\n"


@pytest.mark.parametrize("save_format", ["orbax", "hf"])
def test_quantize_saves_a_model_that_generate_loads(model_dir, tmp_path, capsys, save_format):
    """Saved as our checkpoint or as a compressed-tensors HF directory, the quantized model generates
    what the model quantized at load time does."""
    from jaxinfer import LLM, SamplingParams
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), "--quantization", "int4", "--group-size", "32",
                 "--skip", "layers.0", "--lm-head", "int8", "--out", str(out), "--save-format", save_format]) == 0
    assert (out / "model.safetensors").is_file() == (save_format == "hf")
    capsys.readouterr()
    assert main(["generate", "def add(a, b):", "--model", str(out), "--max-tokens", "8"]) == 0
    ref = LLM(str(model_dir), quantization="int4",
              quantization_config={"group_size": 32, "skip": ["layers.0"], "lm_head": "int8"})
    text = ref.generate("def add(a, b):", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    assert capsys.readouterr().out == "def add(a, b):" + text + "\n"


@pytest.mark.parametrize("args,match", [
    (["--beam-width", "0"], "beam_width=0"),
    (["--presence-penalty", "5"], "presence_penalty=5.0"),
    (["--model", "/no/such/dir"], "no such directory"),
    (["--temperature", "-1"], "temperature=-1.0"),
    (["--max-tokens", "0"], "max_tokens=0"),
    (["--lora-path", "/no/such/adapter"], "no adapter_config.json"),
])
def test_bad_input_exits_nonzero_with_one_line(model_dir, args, match, capsys):
    """In process (`main`'s return code and stderr), except the missing model: a real process, whose
    exit status and stderr are what a shell sees (each such process imports jax afresh: ~4 s)."""
    argv = ["generate", "hello"] + (args if args[0] == "--model" else ["--model", str(model_dir)] + args)
    if args[0] == "--model":
        proc = subprocess.run([sys.executable, "-m", "jaxinfer.cli"] + argv, capture_output=True, text=True,
                              timeout=120)
        rc, err = proc.returncode, proc.stderr
    else:
        rc, err = main(argv), capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxinfer: error:") and match in lines[0], err
    assert "Traceback" not in err


def test_serve_refuses_bad_options_with_one_line(model_dir, capsys):
    assert main(["serve", "--model", str(model_dir), "--speculative-config", "{nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--speculative-config '{nope' is not JSON" in err[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(model_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]
    with pytest.raises(SystemExit) as e:  # checked by argparse, before the model loads
        main(["serve", "--model", str(model_dir), "--port", "99999"])
    assert e.value.code == 2 and "port 99999 is not in [0, 65535]" in capsys.readouterr().err
