"""Expert parallelism through the real CLIs: 2 gloo processes train, save, resume; the sharded
checkpoint is consolidated, decoded on one process, resharded and exported as a dense transformer."""
import os
import re
import shutil
import subprocess

import pytest
import torch

from distributed_utils import free_port, run_in_processes
from test_cli import BIN, REPO, make_toy_data, run

pytestmark = pytest.mark.cli
NUM_EXPERTS = 4
MODEL = ["--arch", "thor_transformer", "--encoder-layers", "2", "--decoder-layers", "2",
         "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
         "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
         "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
         "--num-experts", str(NUM_EXPERTS), "--expert-parallel"]
MAX_LEN_B = 12


def train_in_processes(tool, data, save_dir, *extra, world_size=2):
    """One fairseq training process per rank over gloo (the CPU recipe in DESIGN.md/README)."""
    port = free_port()
    args = [data, "--user-dir", "fairseq_thor", "--cpu", "--task", "translation_thor", *MODEL,
            "--criterion", "thor_consistency", "--consistency-alpha", "1.0", "--label-smoothing", "0.1",
            "--optimizer", "adam", "--lr", "0.003", "--clip-norm", "1.0", "--max-tokens", "500",
            "--save-dir", save_dir, "--log-format", "simple", "--log-interval", "1",
            "--no-epoch-checkpoints", "--seed", "3", "--ddp-backend", "legacy_ddp",
            "--distributed-backend", "gloo", "--distributed-init-method", f"tcp://127.0.0.1:{port}",
            "--distributed-no-spawn", "--distributed-world-size", str(world_size), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([os.path.join(BIN, tool), *map(str, args), "--distributed-rank", str(r)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(world_size)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return [p.returncode for p in procs], outs


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    data, ckpt = make_toy_data(root), root / "ckpt"
    codes, first = train_in_processes("fairseq-thor-train", data, ckpt, "--max-update", "6")
    assert codes == [0, 0], first[0][-3000:] + first[1][-3000:]
    files = sorted(os.listdir(ckpt))
    codes, resumed = train_in_processes("fairseq-thor-train", data, ckpt, "--max-update", "10")
    assert codes == [0, 0], resumed[0][-3000:]
    consolidated = root / "consolidated.pt"
    run("fairseq-thor-consolidate", ckpt / "checkpoint_last-rank-1.pt", "--out", consolidated)
    return {"root": root, "data": data, "ckpt": ckpt, "files": files, "first": first,
            "resumed": resumed, "consolidated": consolidated}


def test_every_rank_saves_its_experts_beside_one_shared_file(sharded):
    for name in ("checkpoint_last", "checkpoint_best"):
        assert {f"{name}-rank-0.pt", f"{name}-rank-1.pt"} <= set(sharded["files"])
    assert "checkpoint_last-shared.pt" in sharded["files"]
    assert not any(f.endswith(".tmp") or f == "checkpoint_last.pt" for f in sharded["files"])
    rank0 = torch.load(sharded["ckpt"] / "checkpoint_last-rank-0.pt", weights_only=True)
    bank = rank0["model"]["encoder.layers.0.fc1.weight"]
    assert bank.shape == (NUM_EXPERTS // 2, 64, 32)  # two of the four experts


def epoch_losses(log):
    return [float(x) for x in re.findall(r"INFO:train:epoch \d+ \| loss ([\d.]+)", log)]


def test_training_resumes_from_the_sharded_files(sharded):
    log = sharded["resumed"][0]  # fairseq logs on rank 0 only
    assert re.search(r"Loaded checkpoint .* \(epoch \d+ @ 6 updates\)", log), log[-2000:]
    assert "num_updates 10" in log and "num_updates 1 " not in log
    # the loss goes on falling from where the first run stopped
    assert epoch_losses(log)[-1] < epoch_losses(sharded["first"][0])[-1] < epoch_losses(sharded["first"][0])[0]


def test_a_rank_with_an_empty_batch_does_not_hang(sharded):
    # the 13 validation sentences make one batch: rank 1's shard of it is empty, fairseq gives
    # it a dummy batch (loss x 0) and both ranks still meet in every all-to-all
    for log in (sharded["first"][0], sharded["resumed"][0]):
        assert re.search(r"valid on 'valid' subset \|.*\| bsz 13 \|", log), log[-1500:]


def generate(checkpoint, data, *extra, user_dir=True):
    # stock fairseq needs a batch multiple of 1 to decode every sentence (its default 8 drops some)
    plugin = ["--user-dir", "fairseq_thor", "--task", "translation_thor"] if user_dir else [
        "--required-batch-size-multiple", "1"]
    _, out = run("fairseq-generate", data, *plugin, "--cpu", "--path", checkpoint,
                 "--gen-subset", "test", "--beam", "1", "--max-len-b", MAX_LEN_B, *extra)
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^H-(\d+)\t\S+\t(.*)$", out, re.M)}


def greedy_on_two_ranks(rank, world_size, ckpt_prefix, expert, expected):
    """Decode the test set with the sharded model itself (both ranks in lockstep, fixed expert)."""
    import fairseq_thor  # noqa: F401
    from fairseq import tasks
    from omegaconf import OmegaConf

    from fairseq_thor.distributed import sharded_checkpoint as shards
    from fairseq_thor.modules.expert_parallel_ffn import expert_parameter_names

    rank_state = shards.load(shards.rank_path(ckpt_prefix, rank))
    shared = shards.shared_for(ckpt_prefix, rank_state)
    task = tasks.setup_task(OmegaConf.create(shared["cfg"]["task"]))
    model = task.build_model(shared["cfg"]["model"])
    names = [n for n, p in model.named_parameters()]
    state = shards.merge_for_rank(shared, rank_state, names, expert_parameter_names(model))
    model.load_state_dict(state["model"])
    model.eval()
    model.set_inference_routing("fixed", expert=expert)
    task.load_dataset("test")
    dataset = task.dataset("test")
    batch = dataset.collater([dataset[i] for i in range(len(dataset))])
    src, src_len = batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"]
    d = task.target_dictionary
    prev = torch.full((src.size(0), 1), d.eos())
    done = torch.zeros(src.size(0), dtype=torch.bool)
    with torch.no_grad():
        for step in range(MAX_LEN_B + 1):
            lprobs = model(src, src_len, prev)[0][:, -1].log_softmax(-1)
            lprobs[:, d.pad()] = -float("inf")
            if step == 0:
                lprobs[:, d.eos()] = -float("inf")  # fairseq's min length of 1
            best = lprobs.argmax(-1) if step < MAX_LEN_B else torch.full_like(done, d.eos(), dtype=torch.long)
            best[done] = d.pad()
            done |= best == d.eos()
            prev = torch.cat([prev, best.unsqueeze(1)], dim=1)
    if rank == 0:
        for row, sample_id in enumerate(batch["id"].tolist()):
            tokens = [t for t in prev[row, 1:].tolist() if t not in (d.pad(), d.eos())]
            assert d.string(torch.tensor(tokens)) == expected[sample_id], sample_id


def consolidated_fixed(sharded, expert):
    """The consolidated model's hypotheses with one fixed expert, decoded once per module: the
    two-rank comparison and the dense-export comparison below both need them."""
    cache = sharded.setdefault("fixed_hypotheses", {})
    if expert not in cache:
        cache[expert] = generate(sharded["consolidated"], sharded["data"],
                                 "--inference-routing", "fixed", "--inference-expert", expert)
    return cache[expert]


@pytest.mark.parametrize("expert", [0, 3])  # experts 0-1 live on rank 0, 2-3 on rank 1
def test_consolidated_model_translates_like_the_two_rank_model(sharded, expert):
    hypotheses = consolidated_fixed(sharded, expert)
    assert len(hypotheses) == 13  # every test sentence
    run_in_processes(greedy_on_two_ranks, 2, str(sharded["ckpt"] / "checkpoint_last"), expert,
                     hypotheses)


def test_reshard_to_four_ranks_and_back_keeps_every_tensor(sharded):
    root = sharded["root"]
    run("fairseq-thor-reshard", sharded["ckpt"] / "checkpoint_last-shared.pt", "--world-size", 4,
        "--out", root / "four" / "checkpoint_last")
    assert len([f for f in os.listdir(root / "four") if "-rank-" in f]) == 4
    run("fairseq-thor-consolidate", root / "four" / "checkpoint_last", "--out", root / "back.pt")
    original = torch.load(sharded["consolidated"], weights_only=False)
    back = torch.load(root / "back.pt", weights_only=False)
    assert original["model"].keys() == back["model"].keys()
    for k, v in original["model"].items():
        assert torch.equal(v, back["model"][k]), k
    for i, s in original["last_optimizer_state"]["state"].items():
        for key, value in s.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(back["last_optimizer_state"]["state"][i][key]))
    # a 4-rank checkpoint cannot resume a 2-rank run
    codes, outs = train_in_processes("fairseq-thor-train", sharded["data"], root / "four",
                                     "--max-update", "12")
    assert codes != [0, 0]
    assert "saved by 4 expert-parallel ranks, this run has 2" in outs[0] + outs[1]


@pytest.mark.parametrize("expert, routed_as", [(None, 0), ("3", 3), ("merged", "merged")])
def test_dense_export_loads_in_stock_fairseq(sharded, expert, routed_as):
    dense = sharded["root"] / f"dense-{expert}.pt"
    # from a rank file of the sharded save: consolidated on the way (default: expert 0)
    run("fairseq-thor-export-dense", sharded["ckpt"] / "checkpoint_last-rank-1.pt", "--out", dense,
        *([] if expert is None else ["--expert", expert]))
    stock = generate(dense, sharded["data"], user_dir=False)
    routed = (generate(sharded["consolidated"], sharded["data"], "--inference-routing", "merged")
              if routed_as == "merged" else consolidated_fixed(sharded, routed_as))
    assert len(stock) == 13 and stock == routed


def test_unconsolidated_checkpoints_are_refused_with_the_fix(sharded):
    for name in ("checkpoint_last-rank-0.pt", "checkpoint_last-shared.pt"):
        code, out = run("fairseq-generate", sharded["data"], "--user-dir", "fairseq_thor", "--cpu",
                        "--task", "translation_thor", "--path", sharded["ckpt"] / name,
                        "--gen-subset", "test", check=False)
        assert code != 0 and "fairseq-thor-consolidate" in out


def test_stock_fairseq_train_refuses_to_save_a_sharded_model(sharded, tmp_path):
    codes, outs = train_in_processes("fairseq-train", sharded["data"], tmp_path, "--max-update", "1")
    assert codes != [0, 0]
    assert "must be trained with fairseq-thor-train" in outs[0]
    assert not any(f.endswith(".pt") for f in os.listdir(tmp_path))


# ---- more processes than experts: W = 4, E = 2 (two expert groups, each expert twice) ---------

@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    """4 processes train 2 experts; resume on 4, then on 2 processes (W = E) from the same files."""
    root = tmp_path_factory.mktemp("ep_groups")
    data, ckpt = make_toy_data(root), root / "ckpt"
    two = ["--num-experts", "2"]  # after MODEL's, so it wins
    runs = {}
    for world, updates in ((4, 4), (4, 6), (2, 8)):
        codes, outs = train_in_processes("fairseq-thor-train", data, ckpt, *two,
                                          "--max-update", str(updates), world_size=world)
        assert codes == [0] * world, outs[0][-3000:]
        runs[(world, updates)] = outs[0]
        if updates == 4:
            files = sorted(os.listdir(ckpt))
    consolidated = root / "consolidated.pt"
    run("fairseq-thor-consolidate", ckpt / "checkpoint_last", "--out", consolidated)
    return {"data": data, "ckpt": ckpt, "files": files, "runs": runs, "consolidated": consolidated}


def test_only_the_first_expert_group_saves_each_expert_once(replicated):
    rank_files = sorted(f for f in replicated["files"] if f.startswith("checkpoint_last-"))
    assert rank_files == ["checkpoint_last-rank-0.pt", "checkpoint_last-rank-1.pt",
                          "checkpoint_last-shared.pt"]
    rank1 = torch.load(replicated["ckpt"] / "checkpoint_last-rank-1.pt", weights_only=True)
    assert rank1["expert_parallel"]["world_size"] == 2  # two shards, whatever W saved them
    assert rank1["model"]["encoder.layers.0.fc1.weight"].shape == (1, 64, 32)


def test_four_processes_resume_on_four_and_on_two(replicated):
    runs = replicated["runs"]
    assert re.search(r"Loaded checkpoint .* \(epoch \d+ @ 4 updates\)", runs[(4, 6)]), runs[(4, 6)][-2000:]
    assert re.search(r"Loaded checkpoint .* \(epoch \d+ @ 6 updates\)", runs[(2, 8)]), runs[(2, 8)][-2000:]
    assert "num_updates 8" in runs[(2, 8)]
    losses = [epoch_losses(runs[key])[-1] for key in ((4, 4), (2, 8))]
    assert losses[1] < losses[0], losses


def test_the_consolidated_model_of_four_processes_decodes(replicated):
    state = torch.load(replicated["consolidated"], weights_only=False)
    assert state["model"]["encoder.layers.0.fc1.weight"].shape[0] == 2
    hypotheses = generate(replicated["consolidated"], replicated["data"],
                          "--inference-routing", "fixed", "--inference-expert", 1)
    assert len(hypotheses) == 13


# ---- faults: a resume from mixed saves, a failing rank, shared files of deleted saves ----------

@pytest.fixture(scope="module")
def interval_saves(tmp_path_factory):
    """Saves every 2 updates, keeping the last one: run to 2 updates, keep rank 1's
    checkpoint_last aside (what an interrupted later save leaves), resume to 4."""
    root = tmp_path_factory.mktemp("ep_faults")
    data, ckpt = make_toy_data(root), root / "ckpt"
    keep = ["--save-interval-updates", "2", "--keep-interval-updates", "1"]
    codes, outs = train_in_processes("fairseq-thor-train", data, ckpt, "--max-update", "2", *keep)
    assert codes == [0, 0], outs[0][-3000:]
    stale, stale_shared = root / "stale-rank-1.pt", root / "stale-shared.pt"
    stale.write_bytes((ckpt / "checkpoint_last-rank-1.pt").read_bytes())
    stale_shared.write_bytes((ckpt / "checkpoint_last-shared.pt").read_bytes())
    codes, outs = train_in_processes("fairseq-thor-train", data, ckpt, "--max-update", "4", *keep)
    assert codes == [0, 0], outs[0][-3000:]
    return {"data": data, "ckpt": ckpt, "stale": stale, "stale_shared": stale_shared, "keep": keep,
            "log": outs[0]}


def test_shared_files_follow_keep_interval_updates(interval_saves):
    files = set(os.listdir(interval_saves["ckpt"]))
    numbered = {f for f in files if f.startswith("checkpoint_1_") or f.startswith("checkpoint_2_")}
    updates = {f.split("-")[0] for f in numbered}
    assert len(updates) == 1, sorted(files)  # only the newest save, all three of its files
    (save,) = updates
    assert numbered == {f"{save}-rank-0.pt", f"{save}-rank-1.pt", f"{save}-shared.pt"}
    assert "Removing" in interval_saves["log"] and "-shared.pt: fairseq removes the rank files" in interval_saves["log"]


def error_lines(out):
    """The ``error: ...`` lines of a process's output; torch's distributed exception hook prefixes
    every line of an uncaught error with ``[rankN]: ``."""
    return [re.sub(r"^\[rank\d+\]: ", "", line) for line in out.splitlines()
            if re.match(r"^(\[rank\d+\]: )?error: ", line)]


def resume_with(interval_saves, tmp_path, stale_name):
    """Resume from a copy of the save folder whose rank-1 file is the stale one."""
    folder = tmp_path / "ckpt"
    shutil.copytree(interval_saves["ckpt"], folder)
    shutil.copy(interval_saves["stale"], folder / stale_name)
    return folder, train_in_processes("fairseq-thor-train", interval_saves["data"], folder,
                                      "--max-update", "6", *interval_saves["keep"])


def test_ranks_holding_different_saves_are_refused_not_hung(interval_saves, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(interval_saves["ckpt"], folder)
    shutil.copy(interval_saves["stale"], folder / "checkpoint_last-rank-1.pt")
    # with its own shared file beside it (keep-interval-updates deleted it), rank 1 alone could
    # load its older save and train on: the drill's hang
    shared_name = torch.load(interval_saves["stale"], weights_only=False)["expert_parallel"]["shared_file"]
    shutil.copy(interval_saves["stale_shared"], folder / shared_name)
    codes, outs = train_in_processes("fairseq-thor-train", interval_saves["data"], folder,
                                     "--max-update", "6", *interval_saves["keep"])  # timeout: no hang
    for code, out in zip(codes, outs):
        errors = error_lines(out)
        assert code == 1 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
        assert "the ranks' files come from different saves" in errors[0]
        assert f"{folder}/checkpoint_last-rank-0.pt (update 4)" in errors[0]
        assert f"{folder}/checkpoint_last-rank-1.pt (update 2)" in errors[0]
        assert "--restore-file" in errors[0]
        assert "train_inner" not in out


def test_a_rank_that_cannot_load_its_save_stops_every_rank(interval_saves, tmp_path):
    # the stale rank file names a shared file that keep-interval-updates deleted: only rank 1 fails
    folder, (codes, outs) = resume_with(interval_saves, tmp_path, "checkpoint_last-rank-1.pt")
    for code, out in zip(codes, outs):
        errors = error_lines(out)
        assert code == 1 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
        assert "cannot resume from" in errors[0] and "rank 1: no shared file from the same save" in errors[0]


def test_a_damaged_rank_file_is_refused_by_consolidate_and_by_resume(interval_saves, tmp_path):
    from test_checkpoint_files import flip_bytes_inside_largest_entry

    folder = tmp_path / "ckpt"
    shutil.copytree(interval_saves["ckpt"], folder)
    damaged = folder / "checkpoint_last-rank-1.pt"
    flip_bytes_inside_largest_entry(damaged)
    code, out = run("fairseq-thor-consolidate", folder / "checkpoint_last", "--out", tmp_path / "one.pt",
                    check=False)
    errors = error_lines(out)
    assert code == 1 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert f"checkpoint {damaged} cannot be used" in errors[0] and "fails the CRC check" in errors[0]
    assert not (tmp_path / "one.pt").exists()
    code, out = run("fairseq-thor-reshard", folder / "checkpoint_last", "--world-size", "4",
                    "--out", tmp_path / "four" / "checkpoint_last", check=False)
    assert code == 1 and error_lines(out) == errors and "Traceback" not in out, out[-3000:]
    codes, outs = train_in_processes("fairseq-thor-train", interval_saves["data"], folder,
                                     "--max-update", "6", *interval_saves["keep"])
    for code, out in zip(codes, outs):
        errors = error_lines(out)
        assert code == 1 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
        assert f"rank 1: checkpoint {damaged} cannot be used" in errors[0]


def test_the_damage_hint_and_a_rank_file_spelling_of_it_both_resume(interval_saves, tmp_path):
    from test_checkpoint_files import flip_bytes_inside_largest_entry

    folder = tmp_path / "ckpt"
    shutil.copytree(interval_saves["ckpt"], folder)
    flip_bytes_inside_largest_entry(folder / "checkpoint_last-rank-1.pt")
    code, out = run("fairseq-thor-consolidate", folder / "checkpoint_last", "--out", tmp_path / "one.pt",
                    check=False)
    hint = re.search(r"--restore-file (\S+) with --expert-parallel", error_lines(out)[0])
    assert hint, out[-2000:]
    save = hint.group(1)  # the save's name, not one of its files
    assert re.fullmatch(rf"{folder}/checkpoint_\d+_4\.pt", save), save
    for spelling in (save, save[: -len(".pt")] + "-rank-1.pt"):
        run_dir = tmp_path / f"run-{len(spelling)}"
        shutil.copytree(folder, run_dir)
        spelled = spelling.replace(str(folder), str(run_dir))
        codes, outs = train_in_processes("fairseq-thor-train", interval_saves["data"], run_dir,
                                         "--max-update", "6", *interval_saves["keep"], "--restore-file", spelled)
        assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
        assert re.search(r"Loaded checkpoint .* \(epoch \d+ @ 4 updates\)", outs[0]), outs[0][-2000:]
        assert ("is one file of an expert-sharded save; restoring the save" in outs[0]) == ("-rank-" in spelling)


def test_a_sharded_restore_file_that_names_nothing_stops_every_rank_and_keeps_the_saves(interval_saves, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(interval_saves["ckpt"], folder)
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    wrong = folder / "checkpoint_1_2-rank-1.pt"  # the form an old CRC hint gave; that save is gone
    codes, outs = train_in_processes("fairseq-thor-train", interval_saves["data"], folder, "--max-update", "6",
                                     *interval_saves["keep"], "--restore-file", wrong)
    for code, out in zip(codes, outs):
        errors = error_lines(out)
        assert code == 1 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
        assert f"no checkpoint at {folder}/checkpoint_1_2-rank-0.pt or {folder}/checkpoint_1_2-shared.pt" in errors[0]
        assert "expert-sharded saves there:" in errors[0] and f"{folder}/checkpoint_last.pt" in errors[0]
        assert "train_inner" not in out and "No existing checkpoint found" not in out
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
