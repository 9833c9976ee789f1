#!/usr/bin/env python3
"""Tests prehoc_client.py against a live server (started by run_test.sh).

Environment: PREHOC_TARGET (host:port), PREHOC_EXPECTED_IDS (greedy continuation of
PREHOC_PROMPT_IDS from the embedded engine, comma-separated), PREHOC_PY_STUBS (stub dir);
for Diffuse: PREHOC_DLM_TARGET (a server on the diffusion model) and PREHOC_DLM_EXPECTED_IDS
(`prehoc diffuse` on the same prompt ids and DIFFUSE_ARGS below)."""
import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpc  # noqa: E402
from prehoc_client import PrehocClient  # noqa: E402

CLI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prehoc_client.py")


def run_cli(*args):
    """Runs prehoc_client.py's command line; returns (exit status, stdout, stderr)."""
    p = subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr

TARGET = os.environ["PREHOC_TARGET"]
PROMPT = [int(x) for x in os.environ["PREHOC_PROMPT_IDS"].split(",")]
EXPECTED = [int(x) for x in os.environ["PREHOC_EXPECTED_IDS"].split(",")]


class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.client = PrehocClient(TARGET, timeout=60)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()

    def test_list_models(self):
        models = self.client.list_models()
        self.assertEqual(len(models), 1)
        self.assertEqual(models[0].name, "tiny")
        self.assertEqual(models[0].vocab_size, 260)
        self.assertIn("prhs", list(models[0].sparsity_policies))

    def test_greedy_stream_equals_embedded_engine(self):
        msgs = list(self.client.generate(token_ids=PROMPT, max_tokens=len(EXPECTED)))
        ids = [t for m in msgs for t in m.token_ids]
        self.assertEqual(ids, EXPECTED)
        self.assertTrue(msgs[0].request_id)
        self.assertEqual(msgs[0].served_by, "embedded")
        last = msgs[-1]
        self.assertTrue(last.finished)
        self.assertEqual(last.finish_reason, "length")
        self.assertEqual(last.usage.prompt_tokens, len(PROMPT))
        self.assertEqual(last.usage.completion_tokens, len(EXPECTED))
        self.assertEqual(last.sparsity.policy, "dense")

    def test_text_prompt_and_sparse_policy(self):
        ids, text, last = self.client.generate_all(text="def f(x):", max_tokens=20,
                                                   policy="streaming", budget=8)
        self.assertEqual(len(ids), 20)
        self.assertIsInstance(text, str)
        self.assertEqual(last.sparsity.policy, "streaming")
        self.assertLess(last.sparsity.mean_kept_fraction, 1.0)

    def test_bad_requests_name_the_field(self):
        for kwargs, field in [(dict(token_ids=[256], max_tokens=0), "max_tokens"),
                              (dict(token_ids=[256, 999], max_tokens=2), "token_ids[1]"),
                              (dict(token_ids=[], max_tokens=2), "token_ids"),
                              (dict(token_ids=[256], max_tokens=2, model="nope"), "model")]:
            with self.assertRaises(grpc.RpcError) as cm:
                list(self.client.generate(**kwargs))
            self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn(field, cm.exception.details())
        # Still serving.
        ids, _, _ = self.client.generate_all(token_ids=PROMPT, max_tokens=3)
        self.assertEqual(ids, EXPECTED[:3])

    def test_command_line_streams_text_and_reports_errors(self):
        ids = ",".join(map(str, PROMPT))
        code, out, err = run_cli("--target", TARGET, "--ids", ids, "--max-tokens", "6",
                                 "--policy", "streaming", "--budget", "8")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.endswith("\n"))
        self.assertIn("--- 6 tokens (length)", err)
        self.assertIn("policy=streaming", err)
        code, _, err = run_cli("--target", TARGET, "--ids", ids, "--max-tokens", "0")
        self.assertEqual(code, 1)
        self.assertIn("error: INVALID_ARGUMENT: max_tokens", err)

    def test_cancel_unknown_request_is_not_found(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.client.cancel("no-such-request")
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)


DLM_TARGET = os.environ.get("PREHOC_DLM_TARGET")
DIFFUSE_ARGS = dict(gen_length=8, block_length=4, steps=8, cache="spa", temperature=0.5, seed=3)


@unittest.skipUnless(DLM_TARGET, "PREHOC_DLM_TARGET not set")
class DiffuseTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.client = PrehocClient(DLM_TARGET, timeout=120)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()

    def test_blocks_equal_the_embedded_decoder(self):
        expected = [int(x) for x in os.environ["PREHOC_DLM_EXPECTED_IDS"].split(",")]
        ids, text, msgs = self.client.diffuse_all(token_ids=PROMPT, **DIFFUSE_ARGS)
        self.assertEqual(ids, expected)
        self.assertIsInstance(text, str)
        self.assertTrue(msgs[0].request_id)
        last = msgs[-1]
        self.assertTrue(last.finished)
        self.assertEqual(last.usage.completion_tokens, len(expected))
        self.assertEqual(last.stats.cache, "spa")
        self.assertEqual(last.stats.steps, 8)
        self.assertEqual(len(last.stats.rows_recomputed), 6)

    def test_command_line_prints_blocks_and_stats(self):
        code, out, err = run_cli("--target", DLM_TARGET, "--diffuse", "--ids",
                                 ",".join(map(str, PROMPT)), "--gen-length", "8",
                                 "--block-length", "4", "--steps", "8", "--cache", "spa",
                                 "--temperature", "0.5", "--seed", "3")
        self.assertEqual(code, 0, err)
        self.assertIn("--- 8 tokens", err)
        self.assertIn("in 8 steps, cache=spa", err)
        code, _, err = run_cli("--target", DLM_TARGET, "--diffuse", "--ids", "256",
                               "--cache", "fast")
        self.assertEqual(code, 1)
        self.assertIn("error: INVALID_ARGUMENT: cache", err)

    def test_bad_diffuse_requests_name_the_field(self):
        for kwargs, field in [(dict(gen_length=-1), "gen_length"),
                              (dict(cache="fast"), "cache"),
                              (dict(cache="spa", cache_params={"r_full": -1}),
                               "cache_params.r_full")]:
            with self.assertRaises(grpc.RpcError) as cm:
                list(self.client.diffuse(token_ids=PROMPT, **kwargs))
            self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertTrue(cm.exception.details().startswith(field + ":"),
                            cm.exception.details())


if __name__ == "__main__":
    unittest.main(verbosity=2)
