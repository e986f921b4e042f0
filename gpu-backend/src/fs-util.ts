/** File-system predicates shared by the checkpoint reader and loader, the converter and the test-model writer. */
import { readdir, stat } from "node:fs/promises";

/** Whether `path` exists (anything `stat` can see). */
export async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

/** Whether `path` is a directory. */
export async function isDir(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isDirectory();
  } catch {
    return false;
  }
}

/** Whether `path` is a directory with nothing in it (false for a file or a missing path). */
export async function isEmptyDir(path: string): Promise<boolean> {
  return (await isDir(path)) && (await readdir(path)).length === 0;
}
