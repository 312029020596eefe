"""A preparation's work (data/prepare.py): the input files cut into tasks,
each task's documents split, tokenized and written as shards, then the
task's record, in this process or in worker processes; the records of
finished tasks, and the removal of those no longer in the corpus.

`options` below is the preparation's prepare.Options.
"""

from concurrent import futures
import contextlib
import dataclasses
import multiprocessing
import os
import re
import threading
import time

from data import corpus, disk, shards, store, tokenizers

SHARDS = "shards"


@dataclasses.dataclass(frozen=True)
class Task:
  pieces: tuple[corpus.Piece, ...]
  bytes: int
  key: str


def plan(files: list[str], task_bytes: int) -> list[Task]:
  """Consecutive files of about task_bytes per task; a larger uncompressed
  .jsonl is cut into ranges of task_bytes."""
  pieces = []
  for f in files:
    size = os.path.getsize(f)
    if corpus.is_jsonl(f) and not f.endswith(".gz") and size > task_bytes:
      pieces += [(corpus.Piece(f, s, min(s + task_bytes, size)),
                  min(task_bytes, size - s))
                 for s in range(0, size, task_bytes)]
    else:
      pieces.append((corpus.Piece(f), size))
  tasks, group, total = [], [], 0
  for piece, size in pieces:
    group.append(piece)
    total += size
    if total >= task_bytes:
      tasks.append(Task(tuple(group), total, ""))
      group, total = [], 0
  if group:
    tasks.append(Task(tuple(group), total, ""))
  return tasks


class Worker:
  """Runs tasks: reads, splits and tokenizes documents, writes shards and
  then the task's record."""

  def __init__(self, output: str, tokenizer, options, splitter):
    self.output, self.tok, self.options = output, tokenizer, options
    self.splitter = splitter
    self.dtype = shards.dtype_for(tokenizer.vocab_size)

  def __call__(self, task: Task) -> dict:
    o = self.options
    prefix = os.path.join(self.output, SHARDS, task.key)
    writers = {s: shards.Writer(self.output, f"{SHARDS}/{task.key}-{s}",
                                self.dtype, self.tok.eot_id, o.shard_tokens)
               for s in store.SPLITS}
    splits = {s: {"documents": 0, "tokens": 0, "bytes": 0, "names": []}
              for s in store.SPLITS}
    batch, batch_bytes, empty = [], 0, 0

    def flush():
      try:
        encoded = self.tok.encode_batch([text for _, _, _, text in batch])
      except ValueError as e:  # a character outside a char vocabulary
        path = next(path for _, _, path, text in batch
                    if not _encodes(self.tok, text))
        raise corpus.DataError(
            f"{path}: {e}, which was fitted to the inputs of the first "
            f"preparation of {self.output}; prepare into a new --output "
            "(its vocabulary fitted to every input) or with --tokenizer "
            "byte or bpe") from None
      for (split, num_bytes, _, _), ids in zip(batch, encoded):
        writers[split].add(ids)
        count = splits[split]
        count["documents"] += 1
        count["tokens"] += len(ids) + 1
        count["bytes"] += num_bytes
      batch.clear()

    for piece in task.pieces:
      name = corpus.name(piece.path)
      for text in corpus.documents(piece, o.text_field, o.utf8):
        if not text:
          empty += 1
          continue
        data = text.encode("utf-8")
        split = self.splitter.of(piece.path, data)
        names = splits[split]["names"]
        if o.holdout and names[-1:] != [name]:
          names.append(name)
        batch.append((split, len(data), piece.path, text))
        batch_bytes += len(data)
        if batch_bytes >= 1 << 20:
          flush()
          batch_bytes = 0
    flush()
    for split in store.SPLITS:
      splits[split]["shards"] = writers[split].close()
    record = {"key": task.key, "input_bytes": task.bytes,
              "empty_documents": empty, "splits": splits}
    disk.write_json(prefix + ".json", record)
    return record


def _encodes(tokenizer, text: str) -> bool:
  try:
    tokenizer.encode(text)
  except ValueError:
    return False
  return True


_worker = None  # the Worker of a worker process


def _init_worker(parent: int, output: str, spec: dict, options,
                 splitter) -> None:
  global _worker
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallel over processes
  threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
  _worker = Worker(output, tokenizers.from_json(spec, output), options,
                   splitter)


def _exit_with(parent: int) -> None:
  """Ends this worker once its parent is gone (a SIGKILLed preparation
  would otherwise leave it finishing tasks, then waiting forever, racing
  the next run on the same temporary files)."""
  while os.getppid() == parent:
    time.sleep(0.2)
  os._exit(1)


def _run_task(task: Task) -> dict:
  return _worker(task)


@contextlib.contextmanager
def runner(output: str, tokenizer, options, splitter):
  """A function from tasks to their records (in any order), run in this
  process or in `options.workers` new ones."""
  if not options.workers:
    worker = Worker(output, tokenizer, options, splitter)
    yield lambda tasks: map(worker, tasks)
    return
  with futures.ProcessPoolExecutor(
      options.workers, multiprocessing.get_context("spawn"), _init_worker,
      (os.getpid(), output, tokenizer.to_json(), options, splitter)) as pool:

    def run(tasks):
      running = [pool.submit(_run_task, t) for t in tasks]
      try:
        for done in futures.as_completed(running):
          yield done.result()
      finally:  # on an error, start no more tasks
        pool.shutdown(cancel_futures=True)

    yield run


def finished_record(output: str, key: str) -> dict | None:
  """A finished task's record, if its shards are all there."""
  record = store.read_json(os.path.join(output, SHARDS, key + ".json"))
  if record is None:
    return None
  for split in record["splits"].values():
    for shard in split["shards"]:
      if not os.path.exists(os.path.join(output, shard["file"])):
        return None
  return record


def collect_garbage(output: str, keys: set[str]) -> None:
  """Removes shards and records of tasks no longer in the corpus, and
  temporary files of interrupted runs."""
  for f in os.listdir(os.path.join(output, SHARDS)):
    if f.endswith(".tmp") or re.split(r"[-.]", f)[0] not in keys:
      os.remove(os.path.join(output, SHARDS, f))
