/** Writing to stdout with backpressure; a closed pipe (EPIPE) ends the output quietly. */
export class PipeClosed extends Error {}

export function writeOut(stream: NodeJS.WritableStream, chunk: string | Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (e: NodeJS.ErrnoException) => {
      stream.off('error', onError)
      reject(e.code === 'EPIPE' ? new PipeClosed('output closed') : e)
    }
    stream.once('error', onError)
    const ok = stream.write(chunk, (err) => {
      if (err) return onError(err as NodeJS.ErrnoException)
    })
    const done = () => {
      stream.off('error', onError)
      resolve()
    }
    if (ok) done()
    else stream.once('drain', done)
  })
}
