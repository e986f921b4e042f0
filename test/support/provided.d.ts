/** Values the vitest config provides to tests (`inject(...)`), typed for both test projects. */
import type { GoldenForWorkers } from "./golden-types.ts";

declare module "vitest" {
  export interface ProvidedContext {
    golden: GoldenForWorkers;
  }
}
