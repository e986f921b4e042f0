/** Upload validation and request parsing for `POST /v1/vqa` (and the media-type and image checks the OpenAI route reuses). */
export { readBodyLimited } from "../../../shared/src/read-body.ts";
export {
  MAX_ASPECT_RATIO,
  acceptedMediaType,
  decodeBase64,
  decodeDataUri,
  parseVqaRequest,
  requestBodyCap,
  validateImageBytes,
  type VqaImage,
  type VqaInput,
  type VqaLimits,
} from "./parse-vqa.ts";
