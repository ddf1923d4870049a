/* Stand-ins for TensorRT's native libraries, so that its real Python bindings import on a machine without
 * them (tests/test_trt_api.py). The bindings link libnvinfer, libnvinfer_plugin and libnvonnxparser (SONAMEs
 * lib*.so.<major>) and call only these entry points; names, enums, signatures and tensorrt.plugin need no more.
 * Every factory returns NULL: builders, runtimes and parsers cannot be created. Built once per library:
 *   gcc -shared -fPIC -DNVINFER -Wl,-soname,libnvinfer.so.11 -o libnvinfer.so.11 trt_stubs.c   (etc.) */
#include <stddef.h>

#if defined(NVINFER)
void *createInferBuilder_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return NULL; }
void *getBuilderPluginRegistry(int capability) { return NULL; }
void *getPluginRegistry(void) { return NULL; }
#elif defined(NVONNXPARSER)
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return NULL; }
int getNvOnnxParserVersion(void) { return 0; }
#elif defined(NVINFER_PLUGIN)
int initLibNvInferPlugins(void *logger, const char *plugin_namespace) { return 0; }
#else
#error "define NVINFER, NVONNXPARSER or NVINFER_PLUGIN"
#endif
