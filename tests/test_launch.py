"""The launch contract: every launcher's variables map onto one LaunchEnv."""
from dist_llm.config.plan import make_plan, run_dir_for
from dist_llm.config.schema import JobConfig
from dist_llm.launch.env import expand_first_host, job_id_from_env, port_from_job_id, read_launch_env
from dist_llm.launch.slurm_requeue import current_job_id


def test_single_process_defaults():
    le = read_launch_env({})
    assert (le.rank, le.world_size, le.local_rank, le.launcher) == (0, 1, 0, "single")
    assert not le.is_distributed


def test_torchrun_variables():
    le = read_launch_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                          "GROUP_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (le.rank, le.world_size, le.local_rank, le.node_rank) == (5, 8, 1, 1)
    assert (le.master_addr, le.master_port, le.launcher) == ("n1", 1234, "torchrun")


def test_slurm_variables_and_master_from_nodelist():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    le = read_launch_env(env)
    assert (le.rank, le.world_size, le.local_rank, le.node_rank) == (3, 4, 1, 1)
    assert le.local_world_size == 2
    assert le.master_addr == "gpu07" and le.launcher == "slurm" and le.job_id == "4242"
    assert le.master_port == port_from_job_id("4242")
    # Every rank of a job derives the same port; different jobs differ.
    assert port_from_job_id("4242") != port_from_job_id("4243")


def test_slurm_array_job_id():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "99", "SLURM_ARRAY_JOB_ID": "90",
           "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_NODELIST": "n1"}
    assert read_launch_env(env).job_id == "90_3"


def test_one_job_id_rule_for_run_dir_and_requeue():
    for env, want in (({"SLURM_JOB_ID": "99"}, "99"), ({"SLURM_JOBID": "98"}, "98"),
                      ({"SLURM_JOB_ID": "99", "SLURM_ARRAY_JOB_ID": "90", "SLURM_ARRAY_TASK_ID": "3"}, "90_3"),
                      ({"DIST_LLM_JOB_ID": "raysubmit_1"}, "raysubmit_1"), ({}, None)):
        assert job_id_from_env(env) == want
        if "DIST_LLM_JOB_ID" not in env:
            assert current_job_id(env) == want  # the id scontrol requeues is the one in the run dir name


def test_expand_first_host():
    assert expand_first_host("node[03-05,7],gpu1") == "node03"
    assert expand_first_host("gpu1,gpu2") == "gpu1"
    assert expand_first_host("a-b-c") == "a-b-c"
    assert expand_first_host("rack1-n[10-12]-ib") == "rack1-n10-ib"


def test_run_dir_from_name_and_job_id_not_time():
    cfg = JobConfig(name="exp", output_dir="/out")
    assert str(run_dir_for(cfg.output_dir, cfg.name, None)) == "/out/exp"
    assert str(run_dir_for(cfg.output_dir, cfg.name, "123")) == "/out/exp-123"
    assert str(run_dir_for(cfg.output_dir, cfg.name, "a/b c")) == "/out/exp-a_b_c"  # never a path separator
    assert make_plan(cfg, 1, "123").run_dir == make_plan(cfg, 1, "123").run_dir  # a requeued job finds it
