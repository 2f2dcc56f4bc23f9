// llama.cpp (node-llama-cpp's prebuilt binaries, CPU) on the GGUF files export_teacher.py wrote: greedy
// answers to the same 100 held-out problems, compared with transformers' text and scored by exact match.
// Run as: node benchmarks/gguf_llama_cpp/run.mjs OUT_DIR   (node-llama-cpp installed where node resolves it)
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
import fs from "fs";
import path from "path";

const ref = JSON.parse(fs.readFileSync(path.join(process.argv[2], "reference.json")));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
for (const [kind, file] of Object.entries(ref.files)) {
  const model = await llama.loadModel({modelPath: file});
  const ctx = await model.createContext({contextSize: 256, threads: 1});
  const seq = ctx.getSequence();
  let same = 0, correct = 0;
  const t0 = Date.now();
  for (const row of ref.rows) {
    await seq.clearHistory();
    const out = [];
    for await (const t of seq.evaluate(model.tokenize(row.prompt, true), {temperature: 0})) {  // <s> added
      if (model.isEogToken(t) || out.length >= 64) break;
      out.push(t);
    }
    const text = model.detokenize(out);
    same += text === row.transformers ? 1 : 0;
    const m = /The answer is\s*(-?\d+)/.exec(text);
    correct += m && m[1] === String(row.answer) ? 1 : 0;
  }
  const n = ref.rows.length;
  console.log(JSON.stringify({kind, file, problems: n, same_text_as_transformers: same / n, exact_match: correct / n,
                              seconds: (Date.now() - t0) / 1000}));
  await ctx.dispose();
  await model.dispose();
}
