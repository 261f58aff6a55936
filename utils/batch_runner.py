"""The batch runner: captions each Batch and hands its lines to the writer. A batch that runs out of CUDA memory is
halved and retried; the smaller size is kept, and sent to the batcher for the batches it forms next."""
import sys

from utils.batcher import form_batch

OUT_OF_MEMORY = "CUDA out of memory, even alone"  # recorded, but retried by the next run: not the image's fault


class BatchRunner:
    def __init__(self, captioner, prompts, pending, writer, progress, tag, graphs, batch_size, smaller_sizes):
        self.captioner, self.prompts, self.pending = captioner, prompts, pending
        self.writer, self.progress, self.tag, self.graphs = writer, progress, tag, graphs
        self.batch_size, self.smaller_sizes = batch_size, smaller_sizes  # smaller_sizes: the batcher's queue
        self.captioned = self.failed = 0

    def run(self, batch):
        """Record the batch's unreadable images, then caption its images."""
        self.record_errors(batch.errors)
        if batch.items:
            self.caption(batch)

    def record_errors(self, indexed_errors):
        if indexed_errors:
            self.writer.write_errors([(self.pending[index], error) for index, error in indexed_errors])
            self.failed += len(indexed_errors)
            self.progress.update(len(indexed_errors))

    def caption(self, batch):
        import torch
        if len(batch.items) > self.batch_size:  # formed ahead, before a retry lowered the size
            self.caption_in_parts(batch.items, self.batch_size)
            return
        images = [prepared for _, prepared in batch.items]
        prompts = [self.prompts[key] for key in batch.prompt_keys]
        try:
            results = self.captioner.caption(images, prompts, batch.inputs)
        except torch.cuda.OutOfMemoryError:
            results = None  # retried below, outside the handler, whose traceback still holds the failed batch
        if results is None:
            self.retry_in_halves(batch.items)
            return
        self.writer.write_captions([self.pending[index] for index, _ in batch.items], batch.prompt_keys, results)
        self.captioned += len(batch.items)
        self.progress.update(len(batch.items))

    def retry_in_halves(self, items):
        import torch
        for graph in self.graphs:
            graph.reset()  # the static cache kept from the batch before, and its recording
        torch.cuda.empty_cache()
        if len(items) == 1:
            self.record_errors([(items[0][0], OUT_OF_MEMORY)])
            return
        half = (len(items) + 1) // 2
        if half < self.batch_size:
            self.batch_size = half
            self.smaller_sizes.put(half)
            print(f"\n{self.tag} CUDA out of memory with {len(items)} images: continuing with batches of {half}",
                  file=sys.stderr, flush=True)
        self.caption_in_parts(items, half)

    def caption_in_parts(self, items, size):
        for start in range(0, len(items), size):
            self.caption(form_batch(self.captioner, self.prompts, self.pending, items[start:start + size]))
