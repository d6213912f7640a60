"use strict";
// A small promise-based client for onnxserve's typed services (onnxserve.v1.Inference and
// onnxserve.v1.Models), loaded at run time from the contract in protos/ with @grpc/proto-loader.
// Types: index.d.ts, over the message types `npm run generate` writes from the same protos.

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const DEFAULT_PROTO_ROOT = process.env.ONNXSERVE_PROTOS || path.resolve(__dirname, "..", "..", "protos");
const PROTO_FILES = ["onnxserve/v1/inference.proto", "onnxserve/v1/models.proto"];
// Must match the flags of `npm run generate`, so that the generated types describe the objects
// these options produce: camelCase fields, enums as names, 64-bit integers as numbers.
const LOADER_OPTIONS = { keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true };

function loadServices(protoRoot) {
  const definition = protoLoader.loadSync(PROTO_FILES, { ...LOADER_OPTIONS, includeDirs: [protoRoot] });
  return grpc.loadPackageDefinition(definition).onnxserve.v1;
}

function toMetadata(values) {
  const metadata = new grpc.Metadata();
  for (const [key, value] of Object.entries(values ?? {})) metadata.set(key, value);
  return metadata;
}

class OnnxServeClient {
  constructor(target, options = {}) {
    const services = loadServices(options.protoRoot ?? DEFAULT_PROTO_ROOT);
    const credentials = options.credentials ?? grpc.credentials.createInsecure();
    // No receive limit of the client's own: the server's send limit decides (max_send_message_bytes,
    // GetModel's maxResponseBytes; 64 MiB by default), and the server refuses upfront a request whose
    // answer could not fit it. grpc-js's default of 4 MiB would throw away answers the server may send.
    const channelOptions = { "grpc.max_receive_message_length": -1, ...options.channelOptions };
    this.inference = new services.Inference(target, credentials, channelOptions);
    // Both stubs share one channel (one HTTP/2 connection, one balancing policy).
    this.models = new services.Models(target, credentials, {
      ...channelOptions,
      channelOverride: this.inference.getChannel(),
    });
    this.timeoutMs = options.timeoutMs;
    this.metadata = options.metadata;
  }

  encode(request, options) { return this._unary(this.inference, "Encode", request, options); }
  classify(request, options) { return this._unary(this.inference, "Classify", request, options); }
  tagTokens(request, options) { return this._unary(this.inference, "TagTokens", request, options); }
  answer(request, options) { return this._unary(this.inference, "Answer", request, options); }
  fillMask(request, options) { return this._unary(this.inference, "FillMask", request, options); }
  generate(request, options) { return this._unary(this.inference, "Generate", request, options); }
  captionImage(request, options) { return this._unary(this.inference, "CaptionImage", request, options); }
  classifyImage(request, options) { return this._unary(this.inference, "ClassifyImage", request, options); }
  encodeImage(request, options) { return this._unary(this.inference, "EncodeImage", request, options); }
  reconstructImage(request, options) { return this._unary(this.inference, "ReconstructImage", request, options); }
  detectObjects(request, options) { return this._unary(this.inference, "DetectObjects", request, options); }
  segmentImage(request, options) { return this._unary(this.inference, "SegmentImage", request, options); }
  transcribe(request, options) { return this._unary(this.inference, "Transcribe", request, options); }
  classifyAudio(request, options) { return this._unary(this.inference, "ClassifyAudio", request, options); }
  tokenize(request, options) { return this._unary(this.inference, "Tokenize", request, options); }
  detokenize(request, options) { return this._unary(this.inference, "Detokenize", request, options); }
  listModels(options) { return this._unary(this.models, "ListModels", {}, options); }
  getModel(request, options) { return this._unary(this.models, "GetModel", request, options); }

  // A readable stream of GenerateStreamResponse messages: `for await (const piece of ...)`; a
  // failed call throws its grpc.ServiceError from the loop.
  generateStream(request, options) {
    return this.inference.GenerateStream(request, this._metadata(options), this._callOptions(options));
  }

  // A readable stream of TranscribeStreamResponse messages, one per segment or chunk; the last
  // carries the whole transcription and the metadata.
  transcribeStream(request, options) {
    return this.inference.TranscribeStream(request, this._metadata(options), this._callOptions(options));
  }

  close() {
    this.models.close();
    this.inference.close();
  }

  _metadata(options) {
    return toMetadata({ ...this.metadata, ...options?.metadata });
  }

  _callOptions(options) {
    const timeoutMs = options?.timeoutMs ?? this.timeoutMs;
    return timeoutMs === undefined ? {} : { deadline: Date.now() + timeoutMs };
  }

  _unary(stub, method, request, options) {
    return new Promise((resolve, reject) => {
      stub[method](request, this._metadata(options), this._callOptions(options), (error, response) =>
        error ? reject(error) : resolve(response),
      );
    });
  }
}

module.exports = { OnnxServeClient, DEFAULT_PROTO_ROOT, grpc };
