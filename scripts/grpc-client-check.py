#!/usr/bin/env python3
"""An independent client of the rsllm fleet: stubs generated from proto/ by grpcio-tools at run
time, then every public rpc of the three services called once and checked, plus grpc.health.v1.

usage: grpc-client-check.py --proto DIR --embedding HOST:PORT --prompt HOST:PORT --llm HOST:PORT

Run by the integration tests (RSLLM_CI_PYTHON, set by scripts/test.sh) against a live fleet.
Exits non-zero, naming the rpc, on the first failed check.
"""
import argparse
import glob
import os
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

TIMEOUT = 300


def generate(proto_dir, out_dir):
    files = sorted(glob.glob(os.path.join(proto_dir, "rsllm", "v1", "*.proto")))
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main(args + files) != 0:
        sys.exit("grpc_tools.protoc failed")
    sys.path.insert(0, out_dir)


def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")
    print(f"ok  {what}")


def main():
    p = argparse.ArgumentParser()
    for flag in ("--proto", "--embedding", "--prompt", "--llm"):
        p.add_argument(flag, required=True)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        generate(a.proto, out)
        from rsllm.v1 import embedding_service_pb2 as e, embedding_service_pb2_grpc as eg
        from rsllm.v1 import prompt_service_pb2 as ps, prompt_service_pb2_grpc as psg
        from rsllm.v1 import llm_service_pb2 as l, llm_service_pb2_grpc as lg

        for name, addr in (("embedding", a.embedding), ("prompt", a.prompt), ("llm", a.llm)):
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(addr))
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            check(status == health_pb2.HealthCheckResponse.SERVING, f"{name}: grpc.health.v1 SERVING")

        emb = eg.EmbeddingServiceStub(grpc.insecure_channel(a.embedding))
        models = emb.ListModels(e.ListModelsRequest(), timeout=TIMEOUT).models
        check(len(models) >= 1, "EmbeddingService/ListModels")
        model = models[0]
        vecs = emb.GetItemEmbeddings(e.GetItemEmbeddingsRequest(model=model.name, item_ids=[1, 2, 3]), timeout=TIMEOUT)
        check(len(vecs.values) == 3 * vecs.dim and vecs.dim == model.dim, "EmbeddingService/GetItemEmbeddings")
        scores = emb.ScoreCandidates(e.ScoreCandidatesRequest(model=model.name, history=[1, 2], candidates=[5, 6, 7]), timeout=TIMEOUT)
        check(len(scores.scores) == 3, "EmbeddingService/ScoreCandidates")
        state = emb.GetUserState(e.GetUserStateRequest(model=model.name, history=[1, 2]), timeout=TIMEOUT)
        check(len(state.values) == model.dim and state.model_version == vecs.model_version, "EmbeddingService/GetUserState")
        top = emb.TopK(e.TopKRequest(model=model.name, history=[1, 2], k=5, exclude_history=True), timeout=TIMEOUT)
        check(len(top.items) == 5 and all(i.item_id not in (1, 2) for i in top.items), "EmbeddingService/TopK")
        try:
            emb.TopK(e.TopKRequest(model=model.name, history=[1], k=0), timeout=TIMEOUT)
            check(False, "EmbeddingService/TopK k=0 is refused")
        except grpc.RpcError as err:
            check(err.code() == grpc.StatusCode.INVALID_ARGUMENT and "k = 0" in err.details(), "EmbeddingService/TopK k=0 -> INVALID_ARGUMENT")

        prm = psg.PromptServiceStub(grpc.insecure_channel(a.prompt))
        domains = prm.ListDomains(ps.ListDomainsRequest(), timeout=TIMEOUT).domains
        check("movielens" in [d.name for d in domains], "PromptService/ListDomains")
        built = prm.BuildPrompt(ps.BuildPromptRequest(domain="movielens", history=[1, 2, 3], candidates=[10, 11], mode=ps.PROMPT_MODE_UNIFIED), timeout=TIMEOUT)
        check(len(built.slots) == 5 and len(built.slot_vectors) == 5 * built.slot_dim and len(built.continuations) == 2, "PromptService/BuildPrompt")
        with_user = prm.BuildPrompt(ps.BuildPromptRequest(domain="movielens", history=[1, 2, 3], candidates=[10, 11], mode=ps.PROMPT_MODE_UNIFIED_WITH_USER), timeout=TIMEOUT)
        check([s.user for s in with_user.slots] == [False] * 3 + [True] + [False] * 2 and len(with_user.slot_vectors) == 6 * with_user.slot_dim, "PromptService/BuildPrompt (user slot)")

        llm = lg.LlmServiceStub(grpc.insecure_channel(a.llm))
        listed = llm.ListModels(l.LlmServiceListModelsRequest(), timeout=TIMEOUT)
        check(len(listed.adapters) >= 1 and len(listed.base_model_version) == 64, "LlmService/ListModels")
        rec = llm.Recommend(l.RecommendRequest(domain="movielens", history=[1, 2, 3], k=2, mode=l.RECOMMEND_MODE_RANKING), timeout=TIMEOUT)
        check(len(rec.items) == 2 and len(rec.candidates) == 20, "LlmService/Recommend (ranking, retrieved candidates)")
        gen = llm.Recommend(l.RecommendRequest(domain="movielens", history=[1, 2, 3], candidates=[10, 11, 12], k=1, mode=l.RECOMMEND_MODE_GENERATIVE), timeout=TIMEOUT)
        check(gen.generated_text != "", "LlmService/Recommend (generative)")
        sc = llm.Score(l.ScoreRequest(domain="movielens", history=[1, 2, 3], candidates=[10, 11]), timeout=TIMEOUT)
        check(len(sc.scores) == 2 and len(sc.mean_scores) == 2, "LlmService/Score")
        job = llm.StartTraining(l.StartTrainingRequest(spec=l.JobSpec(stage=1, dataset="movielens", train_limit=2, max_steps=1, micro_batch=1, grad_accum=1)), timeout=TIMEOUT).job_id
        check(job != "", "LlmService/StartTraining")
        states = [u.state for u in llm.WatchJob(l.WatchJobRequest(job_id=job), timeout=TIMEOUT)]
        check(states and states[-1] == l.JOB_STATE_SUCCEEDED, "LlmService/WatchJob streams to SUCCEEDED")
        done = llm.CancelJob(l.CancelJobRequest(job_id=job), timeout=TIMEOUT)
        check(done.state == l.JOB_STATE_SUCCEEDED, "LlmService/CancelJob on a finished job keeps its state")
    print("python client: every rpc answered as expected")


if __name__ == "__main__":
    main()
