"""Per-model serving settings: engine_args reach the engine's command line, aliases answer and are
listed, capability defaults, and a model's own idle time."""
from __future__ import annotations

import openai
import psutil
import pytest
from django.core.exceptions import ValidationError

from catalog.engine_args import engine_args_errors
from fleet import planner
from fleet.agent.engines.base import EngineLaunch
from fleet.agent.engines.llamacpp import LlamaCppEngine, LlamaServerEngine
from fleet.agent.engines.vllm import VllmEngine
from fleet.models import Instance, Phase
from tests.factories import CatalogModelFactory
from tests.fleet.conftest import offered

HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(300)
def test_engine_args_reach_the_engine_and_an_alias_answers(live_hub, api_key, node_worker, hf):
    offered("gemma-settings", aliases=["tiny-alias"], engine_args=["--n_threads", "1"])
    client = openai.OpenAI(base_url=live_hub.url + "/v1", api_key=api_key, max_retries=0, timeout=120)
    listed = {m.id: m for m in client.models.list().data}
    assert listed["gemma-settings"].model_extra["aliases"] == ["tiny-alias"]
    assert client.models.retrieve("tiny-alias").id == "gemma-settings"

    reply = client.chat.completions.create(model="tiny-alias", messages=HELLO, max_tokens=8)
    assert reply.choices[0].message.content.strip()
    instance = Instance.objects.get(model__model_id="gemma-settings", phase=Phase.READY)
    argv = psutil.Process(instance.pid).cmdline()
    assert argv[argv.index("--n_threads") + 1] == "1"
    assert argv[argv.index("--model_alias") + 1] == "gemma-settings"
    # The alias and the id share one instance: no second load.
    client.chat.completions.create(model="gemma-settings", messages=HELLO, max_tokens=2)
    assert Instance.objects.filter(model__model_id="gemma-settings").count() == 1


def _launch(**extra) -> EngineLaunch:
    return EngineLaunch(instance_id=1, node_name="n", served_model_name="m", model_path="/models/m",
                        context_length=4096, port=9000, **extra)


@pytest.mark.django_db
def test_tools_on_vllm_get_auto_tool_choice_and_their_family_parser():
    qwen = CatalogModelFactory.build(model_id="q", hf_repo="Qwen/Qwen2.5-Coder-32B-Instruct-AWQ",
                                     weight_format="safetensors", engine="vllm", supports_tools=True, chat_format="")
    assert qwen.serving_args == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    coder = CatalogModelFactory.build(model_id="c", hf_repo="Qwen/Qwen3-Coder-Next-FP8", weight_format="safetensors",
                                      engine="vllm", supports_tools=True)
    assert coder.serving_args[-1] == "qwen3_coder"
    # The operator's own parser wins, and is not doubled.
    own = CatalogModelFactory.build(model_id="o", hf_repo="acme/mystery-7b", weight_format="safetensors",
                                    engine="vllm", supports_tools=True, engine_args=["--tool-call-parser=pythonic"])
    assert own.serving_args == ["--tool-call-parser=pythonic", "--enable-auto-tool-choice"]
    argv = VllmEngine().command(_launch(extra_args=own.serving_args, gpu_indices=(0,), gpu_total_mb=80000,
                                        vram_mb=20000))
    assert "--enable-auto-tool-choice" in argv and "--tool-call-parser=pythonic" in argv
    # An unknown family with tools and no parser cannot be saved.
    unknown = CatalogModelFactory.build(model_id="u", hf_repo="acme/mystery-7b", weight_format="safetensors",
                                        engine="vllm", supports_tools=True, disk_mb=1)
    with pytest.raises(ValidationError) as refused:
        unknown.full_clean()
    assert "--tool-call-parser" in str(refused.value.message_dict["engine_args"])
    # Without tools, nothing is added.
    plain = CatalogModelFactory.build(model_id="p", hf_repo="Qwen/Qwen3-8B", weight_format="safetensors", engine="vllm")
    assert plain.serving_args == []


def test_llama_server_uses_the_models_own_template_through_jinja_unless_a_format_is_named():
    server = LlamaServerEngine("llama-server")
    assert "--jinja" in server.command(_launch())
    named = server.command(_launch(chat_format="gemma"))
    assert "--jinja" not in named and named[named.index("--chat-template") + 1] == "gemma"


@pytest.mark.parametrize("args, ok", [
    (["--n_threads", "4"], True), (["--n-threads=4"], True), (["--rope_freq_base", "-1"], True),
    (["--port", "1"], False), (["--host=0.0.0.0"], False), (["--n-ctx", "99"], False), (["-c", "99"], False),
    (["--logits_all", "true"], False), (["--n_gpu_layers", "0"], False), ([""], False), (["a\nb"], False),
])
def test_llamacpp_flags_porten_sets_itself_are_refused(args, ok):
    assert (engine_args_errors("llamacpp", args) == []) is ok


def test_every_flag_an_engine_sets_itself_is_reserved():
    """What Porten's own command lines carry may not come again from engine_args."""
    launch = _launch(chat_format="gemma", embeddings=True, gpu_indices=(0,), gpu_total_mb=80000, vram_mb=20000)
    for engine_name, engine in [("llamacpp", LlamaCppEngine()), ("llamacpp", LlamaServerEngine("llama-server")),
                                ("vllm", VllmEngine())]:
        flags = [a for a in engine.command(launch)[1:] if a.startswith("-") and not a[1:2].isdigit()
                 and a not in ("--no-jinja", "--jinja")]
        for flag in flags:
            assert engine_args_errors(engine_name, [flag, "1"]), f"{engine_name}: {flag} is not reserved"


def test_a_models_own_idle_time_overrides_the_demand_window():
    node = planner.NodeState(name="n", gpus=(planner.GpuState(index=0, total_mb=10000, free_mb=8000),),
                             instances=(planner.LoadedInstance(instance_id=1, model_id="short", vram_mb=1000,
                                                               gpu_indices=(0,)),
                                        planner.LoadedInstance(instance_id=2, model_id="long", vram_mb=1000,
                                                               gpu_indices=(0,))))
    idle = planner.idle_instances([node], {"short": 100.0, "long": 100.0}, now_s=200.0, window_s=600.0,
                                  window_s_for={"short": 60.0})
    assert [inst.model_id for _, inst in idle] == ["short"]
