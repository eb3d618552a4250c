"""Data-parallel training on each backend's own distribution engine (`--distribute data_parallel`).

Every replica holds the whole model and trains on its slice of each global batch; gradients are
averaged by the engine, never by kbench:

- JAX: `keras.distribution.DataParallel` over every visible device, a 1-D mesh on the batch
  axis. XLA partitions the jitted step (GSPMD): the global batch is one array sharded across
  the devices, weights are replicated, and the gradient all-reduce is inserted by the
  compiler. BatchNorm statistics are therefore global-batch statistics, so N devices train
  exactly what one device would. Multi-host: set JAX_COORDINATOR_ADDRESS (host:port of
  process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID in every process; `setup` calls
  `jax.distributed.initialize` with them before anything touches a device.
- TensorFlow: `tf.distribute.MirroredStrategy` over the local GPUs (or the logical CPUs that
  `--simulate-devices` made), `MultiWorkerMirroredStrategy` when TF_CONFIG describes a
  cluster. The model and optimizer are built and compiled in `scope()`; Keras' fit hands the
  tf.data pipeline to the strategy, which splits every global batch among the replicas (and,
  multi-worker, shards it among the workers). BatchNorm statistics are per replica.
- PyTorch: one process per device, started by torchrun; `torch.distributed` (NCCL on GPU,
  gloo on CPU) and `DistributedDataParallel`, whose backward hooks all-reduce the gradients.
  Keras' torch trainer knows nothing of DDP, so `prepare` gives the model a train step whose
  forward runs through the DDP wrapper. Each process reads its own slice of every global
  batch (`data_shard`); BatchNorm statistics are per process; like TensorFlow's per-replica
  ones they are averaged over the replicas before each evaluation and at each epoch's end
  (see `sync_non_trainable`), so all replicas hold the same model. Epoch metrics
  are averaged over ranks.

The global batch size is what the user asks for; the per-replica batch is global / replicas
and must divide evenly. The learning rate is never rescaled.

Use (kbench.train does this):

    simulate_devices(n)                    # only with --simulate-devices, first thing
    dist = setup("data_parallel", n, global_batch_size)
    ... seed, build datasets with shard=dist.data_shard() ...
    train_ds, test_ds = dist.distribute_datasets(train_ds, test_ds)
    with dist.scope():
        model = build_model(); model.compile(...)
    dist.prepare(model)
    model.fit(..., callbacks=[*dist.callbacks(), ...], verbose=... if dist.is_chief else 0)
    ... evaluate in every process; only dist.is_chief writes files ...
    dist.shutdown()
"""

import contextlib
import os

from kbench import backend, keras_fixes
from kbench.errors import KbenchError, reason

DISTRIBUTIONS = ("none", "data_parallel")
TORCHRUN_HINT = ("torchrun --standalone --nproc_per_node N <recipe>.py --distribute "
                 "data_parallel ...")


def simulate_devices(n):
    """Split the host CPU into `n` devices for the active backend (jax, tensorflow).

    Must run before the backend's runtime starts: first thing in the process. Raises
    KbenchError when it is too late, when TensorFlow sees a GPU, or under torch (whose
    replicas are processes). Under JAX the GPU check happens in `setup`.
    """
    backend.simulate_cpu_devices(int(n))


class Distribution:
    """How this process takes part in training; the single-replica case (`--distribute none`).

    Subclasses wrap one engine each. Attributes: `name`, `num_replicas` (model replicas in
    the whole job), `is_chief` (the one process that writes files and prints), `devices`,
    `num_processes`, `process_index`, `global_batch_size`.
    """

    name = "none"
    # True where each replica updates its own copy of non-trainable state (BatchNorm moving
    # statistics): TensorFlow strategies and torch DDP. Under JAX it is one global array.
    replicas_keep_own_state = False

    def __init__(self, num_replicas=1, devices=None, num_processes=1, process_index=0,
                 global_batch_size=None):
        self.num_replicas = num_replicas
        self.devices = list(devices if devices is not None else backend.devices())
        self.num_processes = num_processes
        self.process_index = process_index
        self.global_batch_size = global_batch_size

    @property
    def is_chief(self):
        return self.process_index == 0

    def scope(self):
        """Where the model and optimizer are built and compiled."""
        return contextlib.nullcontext()

    def data_shard(self):
        """(index, count) for the training pipeline's `shard=`: the slice of every global
        batch this process reads. (0, 1) where one process feeds all of its replicas."""
        return (0, 1)

    def distribute_datasets(self, train_ds, test_ds):
        """Check (and, where an engine needs it, adapt) the (train, test) Streams fit and
        evaluate get (kbench.data.Stream: a pipeline and its sizes)."""
        return train_ds, test_ds

    def check_model(self, model):
        """A one-line error when `model` cannot train under this engine (built where its
        weights do not belong). Checks only: Run.model calls it before it touches the output
        folder, prepare again."""

    def prepare(self, model):
        """After compile, before fit: hook the compiled model up to the engine."""

    def callbacks(self):
        """Keras callbacks to put first in fit's list, before anything that records logs or
        saves the model: they make the replicas' BatchNorm statistics agree before every
        evaluation and at every epoch's end, and average epoch logs over processes where the
        engine does not."""
        if self.num_replicas == 1 or not self.replicas_keep_own_state:
            return []
        return [sync_replicas_callback(self)]

    def sync_non_trainable(self, model):
        """Average the replicas' copies of the model's float non-trainable variables."""

    def average_logs(self, logs):
        """Average a Keras logs dict over processes, in place."""

    def describe(self):
        """What metrics.json records about the distribution."""
        per_replica = (self.global_batch_size // self.num_replicas
                       if self.global_batch_size else None)
        return {"distribution": self.name, "num_replicas": self.num_replicas,
                "num_processes": self.num_processes, "replica_devices": self.devices,
                "global_batch_size": self.global_batch_size,
                "per_replica_batch_size": per_replica}

    def barrier(self):
        """Wait until every process gets here."""

    def any_process(self, flag):
        """Whether `flag` is true in any process (a stop a signal asked for in one of them:
        all must stop at the same step, or the others would wait in the next step's
        collective forever). One process: `flag` itself, no communication."""
        return bool(flag)

    def mean_over_processes(self, arrays):
        """The element-wise mean of a list of NumPy arrays over processes (each process's
        metric sums, say); one process: `arrays` as they are."""
        return arrays

    def shutdown(self):
        """Release the engine (process group, coordinator); safe to call twice."""

    def check_batch_size(self, global_batch_size):
        check_global_batch(global_batch_size, self.num_replicas)
        self.global_batch_size = global_batch_size

    def __repr__(self):
        return (f"<{type(self).__name__} {self.name}: {self.num_replicas} replica(s), "
                f"process {self.process_index}/{self.num_processes}>")


def check_global_batch(global_batch_size, num_replicas):
    """Every replica gets global / replicas examples per step: it must divide."""
    if global_batch_size is None:
        return
    if global_batch_size < 1 or global_batch_size % num_replicas:
        suggestion = max(num_replicas, global_batch_size - global_batch_size % num_replicas)
        raise KbenchError(f"global batch size {global_batch_size} does not divide among "
                          f"{num_replicas} replicas; use a multiple of {num_replicas}, e.g. "
                          f"--batch-size {suggestion}")


def setup(distribute, simulate=None, global_batch_size=None):
    """Start the backend's distribution engine and return the Distribution.

    "none": one replica. "data_parallel": JAX DataParallel, TF (MultiWorker)MirroredStrategy
    or torch DDP (under torchrun). Call after `simulate_devices` (when simulating) and before
    anything creates a tensor, a model or a dataset. Raises KbenchError (one line) on bad
    input: unknown name, batch size that does not divide among the replicas, torch outside
    torchrun, simulated devices that are missing or shadowed by a GPU.
    """
    if distribute not in DISTRIBUTIONS:
        raise KbenchError(f"unknown --distribute {distribute!r}; use one of: "
                          f"{', '.join(DISTRIBUTIONS)}")
    name = backend.name()
    if distribute == "none":
        if simulate:
            raise KbenchError("--simulate-devices only matters with --distribute data_parallel")
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1:
            raise KbenchError(f"torchrun started {world} processes but --distribute is none, "
                              "so each would train alone; add --distribute data_parallel")
        dist = Distribution()
    elif name == "jax":
        dist = JaxDataParallel(simulate)
    elif name == "tensorflow":
        dist = TensorFlowStrategy(simulate)
    else:
        dist = TorchDDP(simulate, global_batch_size)
    try:
        dist.check_batch_size(global_batch_size)
    except KbenchError:
        dist.shutdown()
        raise
    return dist


def sync_replicas_callback(distribution):
    """A Keras callback that runs the distribution's sync hooks at the right moments."""
    import keras

    class SyncReplicas(keras.callbacks.Callback):
        """Replicas agree on non-trainable state before each evaluation (validation included)
        and at every epoch's end, before later callbacks checkpoint or save the model; epoch
        logs become the job's, not one process's."""

        def __init__(self, distribution):
            super().__init__()
            self.distribution = distribution

        def on_test_begin(self, logs=None):
            self.distribution.sync_non_trainable(self.model)

        def on_epoch_end(self, epoch, logs=None):
            self.distribution.sync_non_trainable(self.model)
            self.distribution.average_logs(logs)

    return SyncReplicas(distribution)


def _floating(variable):
    return "float" in str(variable.dtype)


# --------------------------------------------------------------------------- JAX


class JaxDataParallel(Distribution):
    """keras.distribution.DataParallel over every device of every process."""

    name = "jax_data_parallel"

    def __init__(self, simulate=None):
        import jax
        import keras

        self._initialized_multihost = _jax_distributed_from_env()
        devices = jax.devices()
        if simulate:
            if devices[0].platform != "cpu":
                raise KbenchError(f"--simulate-devices splits the CPU, but JAX runs on "
                                  f"{devices[0].platform} here: drop --simulate-devices to "
                                  "use those devices, or hide them with JAX_PLATFORMS=cpu")
            if jax.local_device_count() != simulate:
                raise KbenchError(f"JAX sees {jax.local_device_count()} CPU device(s), not "
                                  f"{simulate}: call kbench.distribute.simulate_devices first")
        # The pipeline is already sharded per process (data_shard), so Keras must not shard
        # it again; each process's batch becomes its part of one global jax.Array.
        self.distribution = keras.distribution.DataParallel(
            devices=[f"{d.platform}:{d.id}" for d in devices], auto_shard_dataset=False)
        keras.distribution.set_distribution(self.distribution)
        super().__init__(num_replicas=len(devices),
                         devices=[f"{d.platform}:{d.id}" for d in devices],
                         num_processes=jax.process_count(), process_index=jax.process_index())
        self.local_replicas = jax.local_device_count()

    def scope(self):
        return self.distribution.scope()

    def data_shard(self):
        return (self.process_index, self.num_processes)

    def distribute_datasets(self, train_ds, test_ds):
        # jax shards every batch evenly over the devices (no ragged shards), so the last,
        # partial test batch must split too: each process's batch of b examples becomes
        # part of a global batch of b * processes.
        n, batch = test_ds.num_examples, test_ds.batch_size
        if not (n and batch) and self.num_replicas > 1:
            print(f"note: the test data does not say how many examples it holds, so kbench "
                  f"cannot check that its last batch splits evenly over {self.num_replicas} "
                  "devices (kbench's pipelines say; JAX fails on a batch that does not split)")
        elif n and batch:
            for local in {batch, n % batch} - {0}:
                if (local * self.num_processes) % self.num_replicas:
                    usable = n - n % self.local_replicas
                    raise KbenchError(
                        f"JAX splits every test batch evenly over {self.num_replicas} devices, "
                        f"but the {n} test examples leave a batch of {local}; use "
                        f"--test-examples {usable} or a device count that divides {n}")
        return train_ds, test_ds

    def prepare(self, model):
        self.check_model(model)

    def check_model(self, model):
        # A model built before setup() holds single-device weights that the sharded step
        # cannot mix with: catch it here, not as an XLA device-mismatch deep inside fit.
        for variable in model.weights[:1]:
            sharding = getattr(variable.value, "sharding", None)
            if sharding is not None and len(sharding.device_set) != self.num_replicas:
                raise KbenchError("the model was built before kbench.distribute.setup(); "
                                  "build it after setup (inside dist.scope())")

    def barrier(self):
        if self.num_processes > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("kbench.distribute.barrier")

    def any_process(self, flag):
        if self.num_processes == 1:
            return bool(flag)
        import numpy as np
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([bool(flag)]))))

    def mean_over_processes(self, arrays):
        if self.num_processes == 1:
            return arrays
        from jax.experimental import multihost_utils

        return [gathered.mean(axis=0) for gathered in
                (multihost_utils.process_allgather(a) for a in arrays)]

    def shutdown(self):
        import keras

        if keras.distribution.distribution() is self.distribution:
            keras.distribution.set_distribution(None)
        if self._initialized_multihost:
            import jax

            jax.distributed.shutdown()
            self._initialized_multihost = False


def _jax_distributed_from_env():
    """jax.distributed.initialize from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID when the first is set; returns whether it did."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return False
    import jax

    if not (os.environ.get("JAX_NUM_PROCESSES") and os.environ.get("JAX_PROCESS_ID")):
        raise KbenchError("JAX_COORDINATOR_ADDRESS is set, so this is a multi-process JAX run: "
                          "also set JAX_NUM_PROCESSES (process count) and JAX_PROCESS_ID "
                          "(0..count-1) in every process")
    processes, process_id = (os.environ[name] for name in ("JAX_NUM_PROCESSES",
                                                           "JAX_PROCESS_ID"))
    if not (processes.isdigit() and int(processes) >= 1 and process_id.isdigit()
            and int(process_id) < int(processes)):
        raise KbenchError(f"JAX_NUM_PROCESSES={processes} JAX_PROCESS_ID={process_id}: the "
                          "process count is a whole number >= 1, and each process's id is one "
                          "of 0..count-1")
    processes, process_id = int(processes), int(process_id)
    if jax.distributed.is_initialized():
        return False
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=processes,
                                   process_id=process_id)
    except RuntimeError as exc:
        raise KbenchError(f"jax.distributed.initialize failed ({exc}); it must run before "
                          "anything starts JAX: call kbench.distribute.setup first") from None
    return True


# --------------------------------------------------------------------------- TensorFlow


class TensorFlowStrategy(Distribution):
    """MirroredStrategy on one host; MultiWorkerMirroredStrategy when TF_CONFIG is set."""

    replicas_keep_own_state = True

    def __init__(self, simulate=None):
        import json

        import tensorflow as tf

        if os.environ.get("TF_CONFIG"):
            if simulate:
                raise KbenchError("--simulate-devices and TF_CONFIG do not mix: a multi-worker "
                                  "strategy uses each worker's GPUs or its one CPU")
            example = ('{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
                       '"index": 0}}')
            try:
                cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
            except (ValueError, AttributeError):  # not JSON; JSON but not an object
                raise KbenchError(f"TF_CONFIG is not a JSON object like {example}: fix it, or "
                                  "unset it to train on this machine alone") from None
            self.name = "tf_multi_worker"
            try:
                self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
            except (TypeError, ValueError) as exc:  # TensorFlow's reading of TF_CONFIG
                raise KbenchError(f"TF_CONFIG is not usable ({reason(exc)}); it looks like "
                                  f"{example}") from None
            workers = sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))
            resolver = self.strategy.cluster_resolver
            index = resolver.task_id + (1 if resolver.task_type == "worker"
                                        and "chief" in cluster else 0)
            # should_checkpoint is TF's own answer to "am I the chief?"
            self._chief = bool(self.strategy.extended.should_checkpoint)
        else:
            gpus = tf.config.list_logical_devices("GPU")
            if simulate:
                cpus = tf.config.list_logical_devices("CPU")
                if gpus or len(cpus) != simulate:
                    raise KbenchError(f"TensorFlow sees {len(cpus)} CPU device(s), not "
                                      f"{simulate}: call kbench.distribute.simulate_devices "
                                      "first")
                local = [d.name for d in cpus]
            else:
                local = [d.name for d in gpus] or ["/cpu:0"]
            self.name = "tf_mirrored"
            self.strategy = tf.distribute.MirroredStrategy(devices=local)
            workers, index, self._chief = 1, 0, True
        super().__init__(num_replicas=self.strategy.num_replicas_in_sync,
                         devices=list(self.strategy.extended.worker_devices),
                         num_processes=workers, process_index=index)

    @property
    def is_chief(self):
        return self._chief

    def scope(self):
        return self.strategy.scope()

    def check_model(self, model):
        # Variables made outside scope() are plain, and the strategy would train a copy per
        # replica that never syncs: refuse instead.
        import tensorflow as tf

        for variable in model.trainable_variables[:1]:
            if not isinstance(variable.value, tf.distribute.DistributedValues):
                raise KbenchError("the model was built outside dist.scope(): build and "
                                  "compile it inside `with dist.scope():`")

    def prepare(self, model):
        self.check_model(model)
        if self.name == "tf_multi_worker":
            keras_fixes.multi_worker_build(model)
            self._restore_reduce = keras_fixes.multi_worker_log_reduction()

    def distribute_datasets(self, train_ds, test_ds):
        if self.name == "tf_multi_worker":
            # Our pipelines start from an index range, not files: say so, rather than let
            # tf.distribute look for files first. DATA: every worker runs the pipeline and
            # keeps its replicas' slices of each global batch.
            import tensorflow as tf

            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.DATA)
            train_ds, test_ds = (stream.map_dataset(lambda ds: ds.with_options(options))
                                 for stream in (train_ds, test_ds))
        return train_ds, test_ds

    def shutdown(self):
        restore = getattr(self, "_restore_reduce", None)
        if restore is not None:
            restore()
            self._restore_reduce = None

    def sync_non_trainable(self, model):
        """Average each replica's BatchNorm moving statistics into every replica.

        Keras creates them with aggregation "none", so under a strategy each replica updates
        its own copy inside the MirroredVariable and reads (evaluation, saving) see replica
        0's. The mean over replicas is what one device computes for the moving mean (an
        exponential average is linear in the batch means); the moving variance misses only
        the spread between the replicas' batch means.
        """
        import tensorflow as tf

        strategy = self.strategy
        for variable in model.non_trainable_variables:
            value = variable.value
            if not _floating(variable) or not isinstance(value, tf.distribute.DistributedValues):
                continue
            parts = strategy.experimental_local_results(value)
            # tf.identity: handed the component variables themselves, TF would rebuild the
            # MirroredVariable, and reducing that returns replica 0's copy unaveraged.
            per_replica = strategy.experimental_distribute_values_from_function(
                lambda context, parts=parts: tf.identity(
                    parts[context.replica_id_in_sync_group % len(parts)]))
            # reduce: the engine's all-reduce (across workers too); assign in cross-replica
            # context writes every replica's copy.
            variable.assign(strategy.reduce("MEAN", per_replica, axis=None))

    def barrier(self):
        if self.num_processes > 1:
            # A one-number all-reduce: returns only when every worker has sent its part.
            import tensorflow as tf

            self.strategy.reduce("SUM", self.strategy.run(lambda: tf.constant(1.0)), axis=None)

    def any_process(self, flag):
        if self.num_processes == 1:
            return bool(flag)
        import tensorflow as tf

        value = 1.0 if flag else 0.0  # this worker's; the sum is over workers' replicas
        total = self.strategy.reduce("SUM", self.strategy.run(lambda: tf.constant(value)),
                                     axis=None)
        return float(total) > 0


# --------------------------------------------------------------------------- PyTorch


class TorchDDP(Distribution):
    """torch.distributed + DistributedDataParallel, one process per device (torchrun)."""

    name = "torch_ddp"
    replicas_keep_own_state = True

    def __init__(self, simulate=None, global_batch_size=None):
        if simulate:
            raise KbenchError("--simulate-devices is for jax and tensorflow; torch replicas "
                              f"are processes: {TORCHRUN_HINT}")
        needed = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        if any(key not in os.environ for key in needed):
            raise KbenchError("torch data_parallel runs one process per device, started by "
                              f"torchrun: {TORCHRUN_HINT}")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # Before the process group: a bad batch size must not leave ranks waiting for peers.
        check_global_batch(global_batch_size, world)
        import torch
        import torch.distributed as dist

        self.local_rank = int(os.environ["LOCAL_RANK"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if torch.cuda.is_available():
            if self.local_rank >= torch.cuda.device_count():
                raise KbenchError(f"local rank {self.local_rank} has no GPU (this host has "
                                  f"{torch.cuda.device_count()}); use --nproc_per_node "
                                  f"{torch.cuda.device_count()} or fewer")
            # Keras puts tensors on "cuda", i.e. the current device: make it this rank's.
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            group_backend = "nccl"
        else:
            self.device = torch.device("cpu")
            group_backend = "gloo"
            _share_cpu_threads(torch, local_world)
        if not dist.is_initialized():
            kwargs = {"device_id": self.device} if group_backend == "nccl" else {}
            dist.init_process_group(backend=group_backend, **kwargs)
        self._dist = dist
        self.ddp = None
        kind = "cuda" if group_backend == "nccl" else "cpu"
        super().__init__(num_replicas=world,
                         devices=[f"rank{r}:{kind}" for r in range(world)],
                         num_processes=world, process_index=rank)

    def data_shard(self):
        return (self.process_index, self.num_processes)

    def prepare(self, model):
        import types

        from torch.nn.parallel import DistributedDataParallel

        if not model.built:
            raise KbenchError("build the model before dist.prepare(model) (call it once on a "
                              "batch, or give it an Input): DDP wraps existing weights")
        if self.ddp is not None:
            # Prepared again after a recompile that changed what trains (fine-tuning): DDP
            # fixes its set of gradients at construction, so wrap anew. The old wrapper's
            # reducer removes its gradient hooks when it is destroyed: destroy it first.
            import gc

            self.ddp = None
            model.train_step = None
            gc.collect()
        # DDP broadcasts rank 0's parameters (trainable and not) at construction, so every
        # rank starts from the same weights whatever its RNG did.
        self.ddp = DistributedDataParallel(
            model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        model.train_step = types.MethodType(keras_fixes.ddp_train_step(self.ddp), model)

    def sync_non_trainable(self, model):
        """Average the ranks' BatchNorm moving statistics into every rank.

        Keras keeps them as parameters without gradients, which DDP neither reduces nor
        treats as buffers, so each rank updated them from its own slice. The mean over ranks
        is what one process computes for the moving mean (an exponential average is linear in
        the batch means); the moving variance misses only the spread between the ranks'
        batch means. Afterwards every rank evaluates and saves the same model.
        """
        import torch

        with torch.no_grad():
            for variable in model.non_trainable_variables:
                if _floating(variable):
                    tensor = variable.value.data
                    # NCCL takes only tensors contiguous in their memory format; a frozen
                    # Conv2D kernel in torch's weight layout (kbench.fast_path) is neither.
                    dense = tensor if tensor.is_contiguous() else tensor.contiguous()
                    # SUM, then divide: gloo has no AVG.
                    self._dist.all_reduce(dense, op=self._dist.ReduceOp.SUM)
                    dense.div_(self.num_processes)
                    if dense is not tensor:
                        tensor.copy_(dense)

    def average_logs(self, logs):
        """Average a logs dict over ranks in place. Every rank ran the same number of steps on
        equal slices, so the mean of the ranks' means is the mean over the global batches."""
        import torch

        if not logs:
            return
        keys = sorted(logs)
        values = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64,
                              device=self.device)
        self._dist.all_reduce(values, op=self._dist.ReduceOp.SUM)
        logs.update(zip(keys, (values / self.num_processes).tolist()))

    def barrier(self):
        if self._dist.is_initialized():
            self._dist.barrier()

    def any_process(self, flag):
        import torch

        asked = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._dist.all_reduce(asked, op=self._dist.ReduceOp.MAX)
        return bool(asked.item())

    def mean_over_processes(self, arrays):
        import numpy as np
        import torch

        means = []
        for array in arrays:
            tensor = torch.as_tensor(np.asarray(array, np.float64), device=self.device)
            self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)  # gloo has no AVG
            means.append((tensor / self.num_processes).cpu().numpy())
        return means

    def shutdown(self):
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def _share_cpu_threads(torch, local_processes):
    """Give each local process its share of the CPU cores.

    torchrun sets OMP_NUM_THREADS=1 when it starts several processes and the user set
    nothing: right for 2 processes on 2 cores, wasteful for 2 on 32. A value other than 1
    is the user's, and is kept.
    """
    if os.environ.get("OMP_NUM_THREADS", "1") != "1":
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, local_processes)))
