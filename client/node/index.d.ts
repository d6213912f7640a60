// Types of index.js. The message types are generated from protos/ by `npm run generate`
// (proto-loader-gen-types, run on `npm install`): `X` is what a request accepts, `X__Output` what
// a response holds, with camelCase fields, enum names as strings and 64-bit integers as numbers.
import * as grpc from "@grpc/grpc-js";
import type { AnswerRequest } from "./generated/onnxserve/v1/AnswerRequest";
import type { AnswerResponse__Output } from "./generated/onnxserve/v1/AnswerResponse";
import type { CaptionImageRequest } from "./generated/onnxserve/v1/CaptionImageRequest";
import type { CaptionImageResponse__Output } from "./generated/onnxserve/v1/CaptionImageResponse";
import type { ClassifyAudioRequest } from "./generated/onnxserve/v1/ClassifyAudioRequest";
import type { ClassifyAudioResponse__Output } from "./generated/onnxserve/v1/ClassifyAudioResponse";
import type { ClassifyImageRequest } from "./generated/onnxserve/v1/ClassifyImageRequest";
import type { ClassifyImageResponse__Output } from "./generated/onnxserve/v1/ClassifyImageResponse";
import type { ClassifyRequest } from "./generated/onnxserve/v1/ClassifyRequest";
import type { ClassifyResponse__Output } from "./generated/onnxserve/v1/ClassifyResponse";
import type { DetectObjectsRequest } from "./generated/onnxserve/v1/DetectObjectsRequest";
import type { DetectObjectsResponse__Output } from "./generated/onnxserve/v1/DetectObjectsResponse";
import type { DetokenizeRequest } from "./generated/onnxserve/v1/DetokenizeRequest";
import type { DetokenizeResponse__Output } from "./generated/onnxserve/v1/DetokenizeResponse";
import type { EncodeImageRequest } from "./generated/onnxserve/v1/EncodeImageRequest";
import type { EncodeImageResponse__Output } from "./generated/onnxserve/v1/EncodeImageResponse";
import type { EncodeRequest } from "./generated/onnxserve/v1/EncodeRequest";
import type { EncodeResponse__Output } from "./generated/onnxserve/v1/EncodeResponse";
import type { FillMaskRequest } from "./generated/onnxserve/v1/FillMaskRequest";
import type { FillMaskResponse__Output } from "./generated/onnxserve/v1/FillMaskResponse";
import type { GenerateRequest } from "./generated/onnxserve/v1/GenerateRequest";
import type { GenerateResponse__Output } from "./generated/onnxserve/v1/GenerateResponse";
import type { GenerateStreamRequest } from "./generated/onnxserve/v1/GenerateStreamRequest";
import type { GenerateStreamResponse__Output } from "./generated/onnxserve/v1/GenerateStreamResponse";
import type { GetModelRequest } from "./generated/onnxserve/v1/GetModelRequest";
import type { ListModelsResponse__Output } from "./generated/onnxserve/v1/ListModelsResponse";
import type { ModelInfo__Output } from "./generated/onnxserve/v1/ModelInfo";
import type { ReconstructImageRequest } from "./generated/onnxserve/v1/ReconstructImageRequest";
import type { ReconstructImageResponse__Output } from "./generated/onnxserve/v1/ReconstructImageResponse";
import type { SegmentImageRequest } from "./generated/onnxserve/v1/SegmentImageRequest";
import type { SegmentImageResponse__Output } from "./generated/onnxserve/v1/SegmentImageResponse";
import type { TagTokensRequest } from "./generated/onnxserve/v1/TagTokensRequest";
import type { TagTokensResponse__Output } from "./generated/onnxserve/v1/TagTokensResponse";
import type { TokenizeRequest } from "./generated/onnxserve/v1/TokenizeRequest";
import type { TokenizeResponse__Output } from "./generated/onnxserve/v1/TokenizeResponse";
import type { TranscribeRequest } from "./generated/onnxserve/v1/TranscribeRequest";
import type { TranscribeResponse__Output } from "./generated/onnxserve/v1/TranscribeResponse";
import type { TranscribeStreamRequest } from "./generated/onnxserve/v1/TranscribeStreamRequest";
import type { TranscribeStreamResponse__Output } from "./generated/onnxserve/v1/TranscribeStreamResponse";

export interface ClientOptions {
  /** Default: insecure (plaintext h2c). */
  credentials?: grpc.ChannelCredentials;
  /** e.g. {"grpc.service_config": JSON.stringify({loadBalancingConfig: [{round_robin: {}}]})}. */
  channelOptions?: grpc.ChannelOptions;
  /** The folder holding onnxserve/v1/*.proto; default $ONNXSERVE_PROTOS, else the repository's protos/. */
  protoRoot?: string;
  /** Deadline of every call, in milliseconds from its start; default none. */
  timeoutMs?: number;
  /** Request metadata sent with every call, e.g. {authorization: "Bearer ..."}. */
  metadata?: Record<string, string>;
}

export interface CallOptions {
  /** This call's deadline in milliseconds, instead of the client's. */
  timeoutMs?: number;
  /** Metadata for this call, merged over the client's. */
  metadata?: Record<string, string>;
}

/** Promise-based calls; a failed call rejects with its grpc.ServiceError (code, details). */
export declare class OnnxServeClient {
  constructor(target: string, options?: ClientOptions);
  encode(request: EncodeRequest, options?: CallOptions): Promise<EncodeResponse__Output>;
  classify(request: ClassifyRequest, options?: CallOptions): Promise<ClassifyResponse__Output>;
  tagTokens(request: TagTokensRequest, options?: CallOptions): Promise<TagTokensResponse__Output>;
  answer(request: AnswerRequest, options?: CallOptions): Promise<AnswerResponse__Output>;
  fillMask(request: FillMaskRequest, options?: CallOptions): Promise<FillMaskResponse__Output>;
  generate(request: GenerateRequest, options?: CallOptions): Promise<GenerateResponse__Output>;
  /** One caption per image (`images[i].data`: an encoded file as a Buffer, or `raw` pixels). */
  captionImage(request: CaptionImageRequest, options?: CallOptions): Promise<CaptionImageResponse__Output>;
  /** Labels per image (`images` as for captionImage); with candidateLabels, zero-shot (CLIP). */
  classifyImage(request: ClassifyImageRequest, options?: CallOptions): Promise<ClassifyImageResponse__Output>;
  /** One embedding per image; CLIP models answer `encode` for texts in the same space. */
  encodeImage(request: EncodeImageRequest, options?: CallOptions): Promise<EncodeImageResponse__Output>;
  /** Masked image modeling: per image, the PNG, the float32 reconstruction bytes, the loss, the masked patches. */
  reconstructImage(
    request: ReconstructImageRequest,
    options?: CallOptions,
  ): Promise<ReconstructImageResponse__Output>;
  /** Per image, objects with a label, a score and a box in the image's pixels (`threshold` unset: 0.5). */
  detectObjects(request: DetectObjectsRequest, options?: CallOptions): Promise<DetectObjectsResponse__Output>;
  /**
   * Per image, segments with a label, a score (unset for semantic) and the mask twice: a PNG, and
   * `packedMask` (width x height bits, row-major, first pixel in the high bit of the first byte).
   */
  segmentImage(request: SegmentImageRequest, options?: CallOptions): Promise<SegmentImageResponse__Output>;
  /**
   * Speech recognition, one transcription per audio (`audios[i].data`: an encoded file as a Buffer,
   * or `raw`: float32 little-endian samples with sampleRate and channels); `returnTimestamps`
   * "TIMESTAMPS_SEGMENT" (Whisper), "TIMESTAMPS_WORD" (CTC, and Whisper models with alignment heads) or
   * "TIMESTAMPS_CHAR" (CTC models) fills `chunks`.
   */
  transcribe(request: TranscribeRequest, options?: CallOptions): Promise<TranscribeResponse__Output>;
  /** Labels per audio (`audios` as for transcribe), best first, at most topK (0: 5). */
  classifyAudio(request: ClassifyAudioRequest, options?: CallOptions): Promise<ClassifyAudioResponse__Output>;
  /** An async-iterable stream, one piece per segment or chunk; the last carries the transcription and metadata. */
  transcribeStream(
    request: TranscribeStreamRequest,
    options?: CallOptions,
  ): grpc.ClientReadableStream<TranscribeStreamResponse__Output>;
  /** An async-iterable stream of pieces; the last carries finishReason, generatedText and metadata. */
  generateStream(
    request: GenerateStreamRequest,
    options?: CallOptions,
  ): grpc.ClientReadableStream<GenerateStreamResponse__Output>;
  tokenize(request: TokenizeRequest, options?: CallOptions): Promise<TokenizeResponse__Output>;
  detokenize(request: DetokenizeRequest, options?: CallOptions): Promise<DetokenizeResponse__Output>;
  listModels(options?: CallOptions): Promise<ListModelsResponse__Output>;
  getModel(request: GetModelRequest, options?: CallOptions): Promise<ModelInfo__Output>;
  close(): void;
}

export declare const DEFAULT_PROTO_ROOT: string;
export { grpc };
export type {
  AnswerRequest, AnswerResponse__Output, ClassifyRequest, ClassifyResponse__Output, DetokenizeRequest,
  DetokenizeResponse__Output, EncodeRequest, EncodeResponse__Output, FillMaskRequest, FillMaskResponse__Output,
  GenerateRequest, GenerateResponse__Output, GenerateStreamRequest, GenerateStreamResponse__Output, GetModelRequest,
  ListModelsResponse__Output, ModelInfo__Output, TagTokensRequest, TagTokensResponse__Output, TokenizeRequest,
  TokenizeResponse__Output, CaptionImageRequest, CaptionImageResponse__Output, ClassifyImageRequest,
  ClassifyImageResponse__Output, EncodeImageRequest, EncodeImageResponse__Output, ReconstructImageRequest,
  ReconstructImageResponse__Output, DetectObjectsRequest, DetectObjectsResponse__Output, SegmentImageRequest,
  SegmentImageResponse__Output, TranscribeRequest, TranscribeResponse__Output, TranscribeStreamRequest,
  TranscribeStreamResponse__Output, ClassifyAudioRequest, ClassifyAudioResponse__Output,
};
