"""`gptjax serve` as a user meets it: a server on a loopback port, talked to with the `openai`
client and plain HTTP; its answers against `gptjax sample` and the model's own log-probabilities,
and every bad request refused with an OpenAI error body while the server keeps serving."""

import concurrent.futures
import json
import time

import httpx
import jax
import numpy as np
import openai
import pytest

from conftest import load_checkpoint
from conftest import gptjax_logits
from conftest import run_cli
from conftest import start_cli


@pytest.fixture(scope="module")
def server(tiny_run):
  """(base URL, out_dir) of a server on the tiny run's checkpoint, with 4 slots."""
  out, _ = tiny_run
  process = start_cli("serve", "--checkpoint", out, "--port", "0", "--slots", "4")
  line = process.stdout.readline()
  assert "at http://" in line, process.stderr.read() if process.poll() is not None else line
  yield line.split(" at ")[-1].strip().removesuffix("/v1"), out
  process.terminate()
  process.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _complete(client, **kwargs):
  return client.completions.create(model="out", **{"max_tokens": 12, "temperature": 0, **kwargs})


def test_greedy_text_equals_gptjax_sample_and_ids_equal_text(server, client):
  out = server[1]
  sampled = run_cli("sample", "--checkpoint", out, "--prompt", "ROMEO:", "--temperature", "0", "--num-samples", "1",
                    "--max-new-tokens", "20")
  assert sampled.returncode == 0, sampled.stderr
  served = _complete(client, prompt="ROMEO:", max_tokens=20)
  assert "ROMEO:" + served.choices[0].text == sampled.stdout.split("\n---------------")[0]
  assert served.choices[0].finish_reason == "length" and served.usage.completion_tokens == 20
  _, tok, _, _ = load_checkpoint(out)
  by_ids = _complete(client, prompt=tok.encode("ROMEO:"), max_tokens=20)
  assert by_ids.choices[0].text == served.choices[0].text
  streamed = _complete(client, prompt="ROMEO:", max_tokens=20, stream=True)
  assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == served.choices[0].text


def test_echo_logprobs_are_the_models_log_probabilities(server, client):
  cfg, tok, params, _ = load_checkpoint(server[1])
  prompt = "KING HENRY:\nWhat"
  reply = _complete(client, prompt=prompt, max_tokens=1, echo=True, logprobs=2)
  ids = tok.encode(prompt)
  logprobs = np.asarray(jax.nn.log_softmax(gptjax_logits(cfg, params, [ids])[0], axis=-1))
  got = reply.choices[0].logprobs
  assert got.tokens[:len(ids)] == list(prompt) and got.token_logprobs[0] is None
  expected = logprobs[np.arange(len(ids) - 1), ids[1:]]
  np.testing.assert_allclose(got.token_logprobs[1:len(ids)], expected, atol=1e-4)
  generated = tok.encode(got.tokens[-1])[0]  # the one new token, with the last prompt position's log-probability
  np.testing.assert_allclose(got.token_logprobs[-1], logprobs[-1, generated], atol=1e-4)
  top = got.top_logprobs[len(ids) - 1]  # after "Wha": the two likeliest
  order = np.argsort(-logprobs[len(ids) - 2])[:2]
  assert list(top) == [tok.decode([i]) for i in order]
  np.testing.assert_allclose(list(top.values()), logprobs[len(ids) - 2, order], atol=1e-4)
  assert reply.choices[0].text.startswith(prompt)


def test_stop_sequences_n_and_seeds(client):
  greedy = _complete(client, prompt="ROMEO:", max_tokens=20).choices[0].text
  stop = greedy[5:7]
  cut = _complete(client, prompt="ROMEO:", max_tokens=20, stop=[stop, "never there"])
  assert cut.choices[0].text == greedy[:greedy.index(stop)] and cut.choices[0].finish_reason == "stop"
  many = _complete(client, prompt=["ROMEO:", "JULIET:"], max_tokens=10, temperature=1.0, n=3, seed=4)
  texts = [choice.text for choice in sorted(many.choices, key=lambda c: c.index)]
  assert len(texts) == 6 and len(set(texts)) == 6
  again = _complete(client, prompt=["ROMEO:", "JULIET:"], max_tokens=10, temperature=1.0, n=3, seed=4)
  assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts
  assert many.usage.completion_tokens == 60


def test_concurrent_clients_get_what_each_gets_alone(client):
  prompts = ["ROMEO:", "JULIET:\nO", "First Citizen:", "KING", "To be", "A", "What is", "Thou art"]
  alone = [_complete(client, prompt=p, max_tokens=15).choices[0].text for p in prompts]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:  # 16 clients on 4 slots: most wait their turn
    together = list(pool.map(lambda i: _complete(client, prompt=prompts[i % 8], max_tokens=15).choices[0].text,
                             range(16)))
  assert together == alone * 2


def test_models_health_and_the_tokenizer_endpoints(server, client):
  base = server[0]
  assert [m.id for m in client.models.list().data] == ["out"]
  assert httpx.get(f"{base}/health").json()["status"] == "ok"
  info = httpx.get(f"{base}/tokenizer_info").json()
  assert info["model_max_length"] == 32 and info["eos_token"] is None  # characters: no end-of-text
  tokens = httpx.post(f"{base}/tokenize", json={"prompt": "ROMEO", "add_special_tokens": False}).json()["tokens"]
  assert httpx.post(f"{base}/detokenize", json={"tokens": tokens}).json()["prompt"] == "ROMEO"


BAD_REQUESTS = [
    ("malformed JSON", b'{"prompt": "x", ', 400, None),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("prompt longer than the context", {"prompt": "x" * 40}, 400, "prompt"),
    ("prompt and max_tokens past the context", {"prompt": "x" * 20, "max_tokens": 20}, 400, "max_tokens"),
    ("max_tokens 0", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("temperature NaN", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("temperature negative", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("top_p 0", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p above 1", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("token id outside the vocabulary", {"prompt": [1, 2, 10_000]}, 400, "prompt"),
    ("negative token id", {"prompt": [[1, -1]]}, 400, "prompt"),
    ("character outside the vocabulary", {"prompt": "日本"}, 400, "prompt"),
    ("logprobs above 5", {"prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ("prompt missing", {"max_tokens": 3}, 400, "prompt"),
]


@pytest.mark.parametrize("name,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_a_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, client, name, body, status, param):
  content = body if isinstance(body, bytes) else json.dumps({"model": "out", **body}).encode()
  reply = httpx.post(f"{server[0]}/v1/completions", content=content, headers={"Content-Type": "application/json"})
  assert reply.status_code == status, reply.text
  error = reply.json()["error"]
  assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
  assert _complete(client, prompt="ROMEO:", max_tokens=2).choices[0].finish_reason == "length"


def test_the_openai_client_raises_on_a_bad_request(client):
  with pytest.raises(openai.BadRequestError, match="max_tokens"):
    _complete(client, prompt="x", max_tokens=0)
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model="gpt-9", prompt="x")


def test_a_client_leaving_mid_stream_frees_its_slot(server, client):
  base = server[0]
  body = {"model": "out", "prompt": "ROMEO:", "max_tokens": 26, "stream": True, "temperature": 1.0}
  with httpx.stream("POST", f"{base}/v1/completions", json=body) as stream:
    next(stream.iter_lines())  # the first event: generating
  deadline = time.time() + 30
  while httpx.get(f"{base}/health").json()["busy"] and time.time() < deadline:
    time.sleep(0.1)
  assert httpx.get(f"{base}/health").json()["busy"] == 0
  assert _complete(client, prompt="ROMEO:", max_tokens=2).choices[0].finish_reason == "length"


def test_a_port_in_use_is_one_line(server):
  from conftest import one_line_error
  port = server[0].rsplit(":", 1)[1]
  one_line_error(run_cli("serve", "--checkpoint", server[1], "--port", port), f"cannot listen on 127.0.0.1:{port}",
                 "ddress already in use")


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
  """(base URL, the tokenizers.Tokenizer) of a server on a random Llama-family model whose
  tokenizer (a BPE trained here, with <s> and </s>) has a chat template."""
  import tokenizers
  import torch
  import transformers
  from gptjax import convert
  from gptjax import sources
  root = tmp_path_factory.mktemp("chat")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator([sources.read_text(sources.BUILTIN_SHAKESPEARE)[:50_000]], tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
      num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
      initializer_range=0.2)).save_pretrained(root / "hf")
  (root / "hf" / "tokenizer.json").write_text(tok.to_str())
  (root / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
  convert.import_hf(str(root / "hf"), str(root / "run"))
  process = start_cli("serve", "--checkpoint", root / "run", "--port", "0", "--slots", "2")
  line = process.stdout.readline()
  assert "at http://" in line, line
  yield line.split(" at ")[-1].strip(), tok
  process.terminate()
  process.wait(timeout=60)


def test_chat_completions_follow_the_tokenizers_chat_template(chat_server):
  base, tok = chat_server
  client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
  messages = [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Who is there?"}]
  chat = client.chat.completions.create(model="run", messages=messages, max_tokens=10, temperature=0)
  import jinja2
  rendered = jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
  ids = tok.encode(rendered, add_special_tokens=False).ids
  assert ids.count(0) == 3  # the template's <s> are special tokens, not their characters
  plain = client.completions.create(model="run", prompt=ids, max_tokens=10, temperature=0)
  assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
  assert chat.choices[0].message.content == plain.choices[0].text
  assert chat.usage.prompt_tokens == len(ids)
  streamed = list(client.chat.completions.create(model="run", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
  assert streamed[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == plain.choices[0].text
  assert httpx.get(f"{base.removesuffix('/v1')}/tokenizer_info").json()["chat_template"] == CHAT_TEMPLATE


def test_chat_without_a_template_or_with_bad_messages_is_a_400(server, chat_server):
  reply = httpx.post(f"{server[0]}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
  assert reply.status_code == 400 and "no chat template" in reply.json()["error"]["message"]
  reply = httpx.post(f"{chat_server[0]}/chat/completions", json={"messages": [{"role": "user"}]})
  assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
