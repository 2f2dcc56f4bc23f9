// llama.cpp's tokenizer (node-llama-cpp) on the GGUF files tokenizers_reference.py wrote: how many texts get
// exactly transformers' ids, with a few mismatches shown.
// Run as: node benchmarks/gguf_llama_cpp/tokenize.mjs OUT_DIR
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
import fs from "fs";
import path from "path";

const ref = JSON.parse(fs.readFileSync(path.join(process.argv[2], "tokenizers.json")));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
for (const [name, r] of Object.entries(ref)) {
  const model = await llama.loadModel({modelPath: r.path});
  let same = 0;
  const mismatches = [];
  for (const [text, ids] of r.rows) {
    const got = Array.from(model.tokenize(text, false));
    if (JSON.stringify(got) === JSON.stringify(ids)) same++;
    else if (mismatches.length < 3) mismatches.push({text, transformers: ids, llama_cpp: got});
  }
  console.log(JSON.stringify({tokenizer: name, texts: r.rows.length, identical: same, mismatches}));
  await model.dispose();
}
